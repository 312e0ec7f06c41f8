# Table 5: DyHead (ATSS) with ResNeXt-101 64x4d + DCN, 2x, multi-scale
# training: 52.3 AP on test-dev. Test with multi-scale + flip TTA (Table 5,
# "multi-scale training and multi-scale testing", 54.0 AP) with mmdet's
# test tool and the tta_* settings below:
#   python tools/test.py <this config> <checkpoint> --tta
# The paper does not give its scale ranges (our assumption): training
# samples the short side in [640, 800] (mmdet's "ms-640-800" range); TTA
# runs short sides 400-1200 with and without flip.
_base_ = './atss_x101-64x4d-mdconv-c3-c5_fpn_dyhead-6b_2x_coco.py'

backend_args = None
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='RandomResize', scale=[(1333, 640), (1333, 800)], keep_ratio=True
    ),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))

tta_model = dict(
    type='DetTTAModel',
    tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.6), max_per_img=100),
)
tta_scales = [
    (1333, 400),
    (1333, 600),
    (1333, 800),
    (2000, 1000),
    (2000, 1200),
]
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(
        type='TestTimeAug',
        transforms=[
            [
                dict(type='Resize', scale=s, keep_ratio=True)
                for s in tta_scales
            ],
            [
                dict(type='RandomFlip', prob=1.0),
                dict(type='RandomFlip', prob=0.0),
            ],
            [dict(type='LoadAnnotations', with_bbox=True)],
            [
                dict(
                    type='PackDetInputs',
                    meta_keys=(
                        'img_id',
                        'img_path',
                        'ori_shape',
                        'img_shape',
                        'scale_factor',
                        'flip',
                        'flip_direction',
                    ),
                )
            ],
        ],
    ),
]
