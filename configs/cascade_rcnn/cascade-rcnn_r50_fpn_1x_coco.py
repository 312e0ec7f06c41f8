# Baseline for the Cascade R-CNN + DyHead configs (not a paper row):
# mmdet's Cascade R-CNN R-50 FPN 1x (40.3 AP in mmdet's zoo), three
# Shared2FCBBoxHead stages with IoU thresholds 0.5 / 0.6 / 0.7.
_base_ = 'mmdet::cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['mmdet_dyhead'], allow_failed_imports=False)
