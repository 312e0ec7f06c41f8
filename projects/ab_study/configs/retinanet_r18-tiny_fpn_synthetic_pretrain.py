# Stage 1 of the A/B study: pre-trains the backbone and FPN that both
# compared detectors start from, the way ImageNet weights are shared in the
# paper. The head is RetinaNet's, with one stacked conv: a head that is not
# under test and light enough that the backbone and FPN have to do the work.
# Everything else (data, backbone, FPN, schedule) is the ATSS baseline's.
_base_ = '../../../configs/quickstart/atss_r18-tiny_fpn_synthetic.py'

# The rate the experiments of docs/ab_study.md pre-trained with; the
# compared heads were tuned on top of these weights.
optim_wrapper = dict(optimizer=dict(lr=2e-3))

model = dict(
    type='RetinaNet',
    bbox_head=dict(
        _delete_=True,
        type='RetinaHead',
        num_classes=6,  # the six shapes of the base config's classes
        in_channels={{_base_.feat_channels}},
        stacked_convs=1,
        feat_channels={{_base_.feat_channels}},
        anchor_generator=dict(
            type='AnchorGenerator',
            octave_base_scale=4,
            scales_per_octave=3,
            ratios=[0.5, 1.0, 2.0],
            strides=[8, 16, 32, 64, 128],
        ),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder',
            target_means=[0.0, 0.0, 0.0, 0.0],
            target_stds=[1.0, 1.0, 1.0, 1.0],
        ),
        loss_cls=dict(
            type='FocalLoss',
            use_sigmoid=True,
            gamma=2.0,
            alpha=0.25,
            loss_weight=1.0,
        ),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0),
    ),
    train_cfg=dict(
        _delete_=True,
        assigner=dict(
            type='MaxIoUAssigner',
            pos_iou_thr=0.5,
            neg_iou_thr=0.4,
            min_pos_iou=0,
            ignore_iof_thr=-1,
        ),
        sampler=dict(type='PseudoSampler'),
        allowed_border=-1,
        pos_weight=-1,
        debug=False,
    ),
)
