# Baseline for Table 3 "Faster R-CNN" (paper 36.4): mmdet's Faster R-CNN
# R-50 FPN 1x (37.4 AP in mmdet's zoo), Shared2FCBBoxHead.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['mmdet_dyhead'], allow_failed_imports=False)
