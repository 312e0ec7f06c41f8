# ATSS caffe-R-50 1x + 6 DyHead blocks as microsoft/DynamicHead released it
# (dyhead_r50_atss_fpn_1x.yaml, 42.4 AP there). Weights of that release load
# after tools/convert_official_dyhead.py. Differences from mmdet's
# "reproduction" recipe, each matching the released detectron2 code:
# - DCN convs with bias, PyTorch-default init of the offset conv and of the
#   task-attention FCs: DyHeadNeck(preset='official');
# - P7 = conv(relu(P6)) (detectron2's LastLevelP6P7): relu_before_extra_convs;
# - pre-NMS ranking: the top 1000 candidates per level by class score x
#   centerness (the release's inference), not by class score alone as in
#   mmdet's ATSSHead: DyHeadATSSHead(nms_pre_rank='cls_x_centerness'), which
#   is mmdet's ATSSHead otherwise (same weights, losses, final scores);
# - nothing frozen in the backbone (MODEL.BACKBONE.FREEZE_AT=-1; BN stays
#   frozen); 1000 warm-up iterations from lr x 0.001.
# Kept from the base: caffe R-50 in BGR with detectron2's mean and std 1,
# pad to 128, ATSS with stacked_convs=0, 1x1 predictors, one anchor of
# 8 x stride centred at offset 0.5, pillow resize, NMS 0.6.
# Still different from the release (mmdet's runner and losses; none of these
# changes a weight's name or shape, so converted weights load):
# - schedule: the release trains 90k iterations at 16 images (steps 60k and
#   80k); this config keeps mmdet's 12 epochs at 2 images per GPU (x8 GPUs =
#   16), steps at epochs 8 and 11, which is about the same number of images;
# - FPN init: xavier (mmdet) instead of detectron2's c2_xavier_fill;
# - GIoU loss eps: 1e-6 (mmdet) instead of 1e-7.
_base_ = 'mmdet::dyhead/atss_r50-caffe_fpn_dyhead_1x_coco.py'

custom_imports = dict(imports=['mmdet_dyhead'], allow_failed_imports=False)

model = dict(
    backbone=dict(frozen_stages=-1),
    neck=[
        dict(
            type='FPN',
            in_channels=[256, 512, 1024, 2048],
            out_channels=256,
            start_level=1,
            add_extra_convs='on_output',
            relu_before_extra_convs=True,
            num_outs=5,
        ),
        dict(
            type='DyHeadNeck',
            in_channels=256,
            out_channels=256,
            num_blocks=6,
            num_levels=5,
            preset='official',
        ),
    ],
    bbox_head=dict(type='DyHeadATSSHead', nms_pre_rank='cls_x_centerness'),
)

param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000
    ),
    dict(
        type='MultiStepLR',
        begin=0,
        end=12,
        by_epoch=True,
        milestones=[8, 11],
        gamma=0.1,
    ),
]

# Checks the FPN/DyHead/head wiring before training and testing.
custom_hooks = [dict(type='DyHeadCheckHook')]
