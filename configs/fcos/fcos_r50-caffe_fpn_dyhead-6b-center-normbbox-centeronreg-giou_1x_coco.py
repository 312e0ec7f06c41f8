# Table 3 "FCOS + DyHead" (paper 40.0): the FCOS baseline next to this file
# with 6 DyHead blocks after its FPN (P3-P7) and no conv towers in the head
# (paper Fig. 2b): the classifier, box regressor and centerness read the
# DyHead output directly.
_base_ = (
    './fcos_r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x_coco.py'
)

model = dict(
    neck=[
        dict(
            type='FPN',
            in_channels=[256, 512, 1024, 2048],
            out_channels=256,
            start_level=1,
            add_extra_convs='on_output',
            num_outs=5,
            relu_before_extra_convs=True,
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
