# Mask R-CNN + DyHead in the paper's two-stage form (Fig. 2c; the paper
# shows it for Faster R-CNN only): 6 DyHead blocks with scale- and
# spatial-aware attention on the pyramid (P2-P6) before RoI pooling, and
# task-aware attention in place of the two FC layers of the box head
# (TaskAttnBBoxHead, as in ../faster_rcnn/). RPN and both RoI extractors
# read the attended pyramid.
#
# The mask head stays mmdet's FCNMaskHead (4 convs + deconv on 14x14 RoIs):
# Fig. 2c puts task-aware attention where the box head's FC layers were,
# and the mask head has none; its convs keep the spatial layout a 28x28
# mask needs, and task-aware attention is a per-channel activation that
# would add to them rather than replace anything. Keeping it unchanged
# also keeps the comparison with the baseline to the two DyHead changes.
_base_ = './mask-rcnn_r50_fpn_1x_coco.py'

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
