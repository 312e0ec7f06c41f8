# Faster R-CNN + DyHead as microsoft/DynamicHead released it (40.3 AP in its
# zoo, detectron2; the paper's Fig. 2c design gave 38.9): the full DyHead
# (all three attentions, 6 blocks) on P2-P6 before an unchanged RPN and
# Shared2FCBBoxHead. Not a paper row.
_base_ = './faster-rcnn_r50_fpn_1x_coco.py'

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
