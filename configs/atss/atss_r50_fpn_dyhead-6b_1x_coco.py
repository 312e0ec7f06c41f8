# ATSS R-50 1x + 6 DyHead blocks: mmdet's "simple" DyHead recipe (43.3 AP in
# mmdet's zoo), with our DyHeadNeck in place of mmdet's DyHead (same keys on
# load, same outputs with preset='mmdet'). The head has no conv towers
# (stacked_convs=0): DyHead is the single unified branch of paper Fig. 2b.
# Paper rows: Table 3 "ATSS + DyHead" (42.6), Table 1 "L S C" (42.6),
# Table 2 "6 blocks" (42.6), Table 4 "DyHead R-50 1x" (43.0, test-dev).
_base_ = 'mmdet::dyhead/atss_r50_fpn_dyhead_1x_coco.py'

custom_imports = dict(imports=['mmdet_dyhead'], allow_failed_imports=False)

model = dict(
    neck=[
        dict(
            type='FPN',
            in_channels=[256, 512, 1024, 2048],
            out_channels=256,
            start_level=1,
            add_extra_convs='on_output',
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
