# The quickstart's DyHead detector: the ATSS baseline next to it with DyHead
# blocks after the FPN and no stacked convs in the head (as in mmdet's
# atss_r50_fpn_dyhead recipe). Two blocks instead of the paper's six: one or
# three did worse at this budget (docs/ab_study.md, experiment log).
_base_ = './atss_r18-tiny_fpn_synthetic.py'

model = dict(
    neck=[
        dict(
            type='FPN',
            in_channels=[16, 32, 64, 128],
            out_channels={{_base_.feat_channels}},
            start_level=1,
            add_extra_convs='on_output',
            num_outs=5,
        ),
        dict(
            type='DyHeadNeck',
            in_channels={{_base_.feat_channels}},
            out_channels={{_base_.feat_channels}},
            num_blocks=2,
            num_levels=5,
            # Eq. 4's offsets for the coarser neighbour (mmdet's 'legacy'
            # reads them at the wrong pixels); the better of the two on val.
            preset='aligned',
            # 2 channels per group, like the baseline head's GN(32) at 64
            # channels; mmdet's GN(16) was made for 256 channels.
            norm_cfg=dict(type='GN', num_groups=32, requires_grad=True),
        ),
    ],
    bbox_head=dict(stacked_convs=0),
)

# The offset conv's output is a displacement in pixels, and AdamW moves every
# weight by about lr per step whatever its gradient's scale: at the full rate
# the sampling positions wander before the head has learned anything. x0.025
# (2e-4) was better than x0.1 on val; COCO configs keep SGD and mmdet's
# setting.
optim_wrapper = dict(
    paramwise_cfg=dict(custom_keys=dict(offset_conv=dict(lr_mult=0.025)))
)

# Checks the FPN/DyHead/head wiring before training and testing.
custom_hooks = [dict(type='DyHeadCheckHook')]
