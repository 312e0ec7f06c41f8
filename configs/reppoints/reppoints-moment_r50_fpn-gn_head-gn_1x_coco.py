# Baseline for Table 3 "RepPoints" (paper 38.2): mmdet's RepPoints (moment)
# R-50 1x with GroupNorm in FPN and head (38.1 AP in mmdet's zoo), three-conv
# towers in the head.
_base_ = 'mmdet::reppoints/reppoints-moment_r50_fpn-gn_head-gn_1x_coco.py'

custom_imports = dict(imports=['mmdet_dyhead'], allow_failed_imports=False)
