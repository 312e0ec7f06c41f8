# ATSS caffe-R-50 1x + 6 DyHead blocks: mmdet's "reproduction" recipe
# (42.5 AP in mmdet's zoo) with our DyHeadNeck in place of mmdet's DyHead.
# mmdet's released checkpoint for it loads unchanged: the neck renames
# mmdet's block keys on load (mmdet_dyhead/models/key_mapping.py).
_base_ = 'mmdet::dyhead/atss_r50-caffe_fpn_dyhead_1x_coco.py'

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
            # mmdet's recipe starts the offsets from N(0, 0.01), not from zero
            zero_init_offset=False,
        ),
    ]
)

# Checks the FPN/DyHead/head wiring before training and testing.
custom_hooks = [dict(type='DyHeadCheckHook')]
