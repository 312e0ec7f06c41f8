# The quickstart's DyHead detector: the ATSS baseline next to it with DyHead
# blocks after the FPN and no stacked convs in the head (as in mmdet's
# atss_r50_fpn_dyhead recipe). Two blocks instead of the paper's six keep
# training within the quickstart's CPU budget (each block costs about as
# much as the whole baseline head here).
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
            preset='mmdet',
        ),
    ],
    bbox_head=dict(stacked_convs=0),
)

# The offset conv's output is a displacement in pixels, and AdamW moves every
# weight by about lr per step whatever its gradient's scale: at the full
# 2e-3 the sampling positions wander before the head has learned anything.
# A tenth of the rate gave 17.9 AP instead of 12.0 on the quickstart data
# (docs/quickstart.md, "Tuning"). COCO configs keep SGD and mmdet's setting.
optim_wrapper = dict(
    paramwise_cfg=dict(custom_keys=dict(offset_conv=dict(lr_mult=0.1)))
)

# Checks the FPN/DyHead/head wiring before training and testing.
custom_hooks = [dict(type='DyHeadCheckHook')]
