# Cascade R-CNN + DyHead in the paper's two-stage form (Fig. 2c; the paper
# shows it for Faster R-CNN only): 6 DyHead blocks with scale- and
# spatial-aware attention on the pyramid (P2-P6) before RoI pooling, and in
# each of the three cascade stages task-aware attention in place of the two
# FC layers of the box head (TaskAttnBBoxHead, as in ../faster_rcnn/). The
# stages keep what mmdet's Cascade R-CNN gives them: their own regression
# target stds, class-agnostic regression, SmoothL1 loss, IoU thresholds and
# loss weights (1, 0.5, 0.25). RPN and RoIAlign read the attended pyramid.
_base_ = './cascade-rcnn_r50_fpn_1x_coco.py'

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
            use_task_attn=False,
        ),
    ],
    # A list replaces the base's list as a whole: all three stages.
    roi_head=dict(
        bbox_head=[
            # stage 1, IoU 0.5
            dict(
                type='TaskAttnBBoxHead',
                num_task_attn=2,
                in_channels=256,
                roi_feat_size=7,
                num_classes=80,
                bbox_coder=dict(
                    type='DeltaXYWHBBoxCoder',
                    target_means=[0.0, 0.0, 0.0, 0.0],
                    target_stds=[0.1, 0.1, 0.2, 0.2],
                ),
                reg_class_agnostic=True,
                loss_cls=dict(
                    type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0
                ),
                loss_bbox=dict(type='SmoothL1Loss', beta=1.0, loss_weight=1.0),
            ),
            # stage 2, IoU 0.6
            dict(
                type='TaskAttnBBoxHead',
                num_task_attn=2,
                in_channels=256,
                roi_feat_size=7,
                num_classes=80,
                bbox_coder=dict(
                    type='DeltaXYWHBBoxCoder',
                    target_means=[0.0, 0.0, 0.0, 0.0],
                    target_stds=[0.05, 0.05, 0.1, 0.1],
                ),
                reg_class_agnostic=True,
                loss_cls=dict(
                    type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0
                ),
                loss_bbox=dict(type='SmoothL1Loss', beta=1.0, loss_weight=1.0),
            ),
            # stage 3, IoU 0.7
            dict(
                type='TaskAttnBBoxHead',
                num_task_attn=2,
                in_channels=256,
                roi_feat_size=7,
                num_classes=80,
                bbox_coder=dict(
                    type='DeltaXYWHBBoxCoder',
                    target_means=[0.0, 0.0, 0.0, 0.0],
                    target_stds=[0.033, 0.033, 0.067, 0.067],
                ),
                reg_class_agnostic=True,
                loss_cls=dict(
                    type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0
                ),
                loss_bbox=dict(type='SmoothL1Loss', beta=1.0, loss_weight=1.0),
            ),
        ]
    ),
)

# Checks the FPN/DyHead/head wiring before training and testing.
custom_hooks = [dict(type='DyHeadCheckHook')]
