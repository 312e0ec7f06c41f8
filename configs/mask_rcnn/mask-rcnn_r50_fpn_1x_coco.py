# Baseline for the Mask R-CNN + DyHead configs (not a paper row; the paper
# has no instance segmentation): mmdet's Mask R-CNN R-50 FPN 1x (38.2 box
# AP, 34.7 mask AP in mmdet's zoo), Shared2FCBBoxHead and FCNMaskHead.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['mmdet_dyhead'], allow_failed_imports=False)
