# ATSS Swin-L (384, 22k) + 6 DyHead blocks, multi-scale 2x: mmdet's large
# DyHead model (56.2 AP in mmdet's zoo) with our DyHeadNeck in place of
# mmdet's DyHead. mmdet's released checkpoint loads unchanged.
_base_ = 'mmdet::dyhead/atss_swin-l-p4-w12_fpn_dyhead_ms-2x_coco.py'

custom_imports = dict(imports=['mmdet_dyhead'], allow_failed_imports=False)

model = dict(
    neck=[
        dict(
            type='FPN',
            in_channels=[384, 768, 1536],
            out_channels=256,
            start_level=0,
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
            zero_init_offset=False,
        ),
    ]
)

# Checks the FPN/DyHead/head wiring before training and testing.
custom_hooks = [dict(type='DyHeadCheckHook')]
