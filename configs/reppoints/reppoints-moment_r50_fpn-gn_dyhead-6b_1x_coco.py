# Table 3 "RepPoints + DyHead" (paper 39.6): the RepPoints baseline next to
# this file with 6 DyHead blocks after its FPN (P3-P7) and no conv towers
# (paper Fig. 2b): the point-set and classification branches read the
# DyHead output directly.
_base_ = './reppoints-moment_r50_fpn-gn_head-gn_1x_coco.py'

model = dict(
    neck=[
        dict(
            type='FPN',
            in_channels=[256, 512, 1024, 2048],
            out_channels=256,
            start_level=1,
            add_extra_convs='on_input',
            num_outs=5,
            norm_cfg=dict(type='GN', num_groups=32, requires_grad=True),
        ),
        dict(
            type='DyHeadNeck',
            in_channels=256,
            out_channels=256,
            num_blocks=6,
            num_levels=5,
            preset='mmdet',
        ),
    ],
    bbox_head=dict(stacked_convs=0, feat_channels=256),
)

# Checks the FPN/DyHead/head wiring before training and testing.
custom_hooks = [dict(type='DyHeadCheckHook')]
