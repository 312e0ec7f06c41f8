# Table 4 backbone study: ATSS + 6 DyHead blocks with a ResNeXt-101 64x4d
# backbone, 1x schedule (paper: X-101-64x4d 2x = 47.7 AP on test-dev).
_base_ = './atss_r50_fpn_dyhead-6b_1x_coco.py'

model = dict(
    backbone=dict(
        type='ResNeXt',
        depth=101,
        groups=64,
        base_width=4,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        style='pytorch',
        init_cfg=dict(
            type='Pretrained', checkpoint='open-mmlab://resnext101_64x4d'
        ),
    )
)
