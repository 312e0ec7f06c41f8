# Table 3 "RetinaNet + DyHead" (paper 38.4): the RetinaNet baseline next to
# this file with 6 DyHead blocks after its FPN (P3-P7) and, as in the
# paper's Fig. 2b, no conv towers: the classifier and box regressor read the
# DyHead output directly. (The official release kept the towers, see
# ./retinanet_r50_fpn_dyhead-6b-towers_1x_coco.py.)
_base_ = './retinanet_r50_fpn_1x_coco.py'

model = dict(
    neck=[
        dict(
            type='FPN',
            in_channels=[256, 512, 1024, 2048],
            out_channels=256,
            start_level=1,
            add_extra_convs='on_input',
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
    ],
    bbox_head=dict(stacked_convs=0, feat_channels=256),
)

# Checks the FPN/DyHead/head wiring before training and testing.
custom_hooks = [dict(type='DyHeadCheckHook')]
