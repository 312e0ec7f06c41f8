# Baseline for the RTMDet + DyHead config (not a paper row): mmdet's
# RTMDet-tiny (40.9 AP in mmdet's zoo, 300 epochs, 640x640): CSPNeXt
# backbone, CSPNeXtPAFPN (3 levels of 96 channels, strides 8-32) and
# RTMDetSepBNHead with two 3x3 convs per branch, shared across levels.
_base_ = 'mmdet::rtmdet/rtmdet_tiny_8xb32-300e_coco.py'

custom_imports = dict(imports=['mmdet_dyhead'], allow_failed_imports=False)
