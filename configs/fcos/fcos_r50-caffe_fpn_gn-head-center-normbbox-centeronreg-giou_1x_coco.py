# Baseline for Table 3 "FCOS" (paper 38.8): mmdet's FCOS R-50 (caffe) 1x
# with the improvements (center sampling, normalised boxes, centerness on
# the regression branch, GIoU; 38.7 AP in mmdet's zoo), four-conv towers.
_base_ = (
    'mmdet::fcos/fcos_r50-caffe_fpn_gn-head-center-normbbox-'
    'centeronreg-giou_1x_coco.py'
)

custom_imports = dict(imports=['mmdet_dyhead'], allow_failed_imports=False)
