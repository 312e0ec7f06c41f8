# RTMDet-tiny + DyHead (not a paper row), kept real-time: 2 DyHead blocks
# (all three attentions) on the three 96-channel PAFPN levels (strides 8,
# 16, 32; each level is ceil(previous / 2), as DyHead's scale terms need),
# and the head's two conv towers removed (stacked_convs=0, the paper's
# one-stage form, Fig. 2b): the blocks take the place of the towers, so
# the FLOPs stay close to the baseline's (docs/configs.md has both counts
# and the CPU latency). Everything else (backbone, PAFPN, assigner, losses,
# 300-epoch AdamW recipe, EMA, pipeline switch) is RTMDet-tiny's.
_base_ = './rtmdet_tiny_8xb32-300e_coco.py'

model = dict(
    neck=[
        # mmdet's RTMDet-tiny neck, as the base has it.
        dict(
            type='CSPNeXtPAFPN',
            in_channels=[96, 192, 384],
            out_channels=96,
            num_csp_blocks=1,
            expand_ratio=0.5,
            norm_cfg=dict(type='SyncBN'),
            act_cfg=dict(type='SiLU', inplace=True),
        ),
        dict(
            type='DyHeadNeck',
            in_channels=96,
            out_channels=96,
            num_blocks=2,
            num_levels=3,
            preset='mmdet',
        ),
    ],
    bbox_head=dict(stacked_convs=0),
)

# A list replaces the base's: RTMDet's EMA and pipeline-switch hooks as the
# base has them (switch at epoch 300 - 20), then the wiring check.
custom_hooks = [
    dict(
        type='EMAHook',
        ema_type='ExpMomentumEMA',
        momentum=0.0002,
        update_buffers=True,
        priority=49,
    ),
    dict(
        type='PipelineSwitchHook',
        switch_epoch=280,
        switch_pipeline={{_base_.train_pipeline_stage2}},
    ),
    dict(type='DyHeadCheckHook'),
]
