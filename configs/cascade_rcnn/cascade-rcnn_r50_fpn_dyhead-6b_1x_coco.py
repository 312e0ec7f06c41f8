# Cascade R-CNN + DyHead as a neck (not a paper row): the full DyHead (all
# three attentions, 6 blocks) on P2-P6 after the FPN, before an unchanged
# RPN and the three unchanged Shared2FCBBoxHead stages.
_base_ = './cascade-rcnn_r50_fpn_1x_coco.py'

model = dict(
    neck=[
        dict(
            type='FPN',
            in_channels=[256, 512, 1024, 2048],
            out_channels=256,
            num_outs=5,
        ),
        dict(
            type='DyHeadNeck',
            in_channels=256,
            out_channels=256,
            num_blocks=6,
            num_levels=5,
            preset='mmdet',
        ),
    ]
)

# Checks the FPN/DyHead/head wiring before training and testing.
custom_hooks = [dict(type='DyHeadCheckHook')]
