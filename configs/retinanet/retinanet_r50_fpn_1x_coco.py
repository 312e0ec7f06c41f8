# Baseline for Table 3 "RetinaNet" (paper 35.7): mmdet's RetinaNet R-50 1x
# (36.5 AP in mmdet's zoo), four-conv towers in the head.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['mmdet_dyhead'], allow_failed_imports=False)
