# Table 4 backbone study: ATSS + 6 DyHead blocks with a ResNet-101 backbone,
# 1x schedule (paper: R-101 2x = 46.5 AP on test-dev).
_base_ = './atss_r50_fpn_dyhead-6b_1x_coco.py'

model = dict(
    backbone=dict(
        depth=101,
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet101'),
    )
)
