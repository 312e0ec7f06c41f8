# Baseline for Table 3 "ATSS" (paper 39.4), Table 1 (no attention, 39.0) and
# Table 2 ("Baseline", 39.0): mmdet's ATSS R-50 1x, four-conv towers in the
# head, no DyHead. Compare with ./atss_r50_fpn_dyhead-6b_1x_coco.py, which
# differs only in the neck (FPN + DyHeadNeck) and stacked_convs=0.
_base_ = 'mmdet::atss/atss_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['mmdet_dyhead'], allow_failed_imports=False)
