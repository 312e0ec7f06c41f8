# Table 3 "Faster R-CNN + DyHead" (paper 38.9), the paper's two-stage design
# (Fig. 2c): 6 DyHead blocks with scale- and spatial-aware attention only on
# the pyramid (P2-P6) before RoI pooling, and task-aware attention in place
# of the two FC layers of the box head (TaskAttnBBoxHead). RPN and RoIAlign
# read the attended pyramid. The paper does not say how many blocks it used
# here; 6 is its default.
_base_ = './faster-rcnn_r50_fpn_1x_coco.py'

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
    roi_head=dict(
        bbox_head=dict(
            _delete_=True,
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
            reg_class_agnostic=False,
            loss_cls=dict(
                type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0
            ),
            loss_bbox=dict(type='L1Loss', loss_weight=1.0),
        )
    ),
)

# Checks the FPN/DyHead/head wiring before training and testing.
custom_hooks = [dict(type='DyHeadCheckHook')]
