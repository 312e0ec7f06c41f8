"""Any detector config, shrunk to run in seconds on the synthetic data.

The tests (and anyone checking an install) train and evaluate the shipped
configs, and mmdet's own, through mmengine's Runner and the tools: ResNet-18
with 8 base channels (RTMDet: CSPNeXt at 1/8 width), a 32-channel pyramid,
64 px images; masks are loaded and evaluated when the detector has a mask
head. Everything else (head, losses, assigners, optimizer type) stays what
the config says.
"""

import os.path as osp
from typing import Dict, Optional

from mmengine.config import Config

from .synthetic_coco import SYNTHETIC_CLASSES

TEST_META_KEYS = (
    'img_id',
    'img_path',
    'ori_shape',
    'img_shape',
    'scale_factor',
)


def mmdet_config_path(rel_path: str) -> str:
    """``configs/<rel_path>`` as shipped in the installed mmdet wheel."""
    import mmdet

    return osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', rel_path)


def shrink_model(model: dict, channels: int = 32) -> None:
    """Tiny backbone and pyramid for a detector's model config, in place.

    Args:
        model (dict): ``cfg.model`` of a one- or two-stage detector (cascade
            and mask heads included) with a ResNet backbone and an FPN, or
            a CSPNeXt backbone and a CSPNeXtPAFPN (RTMDet), optionally
            followed by more necks.
        channels (int): Pyramid channels.
    """
    num_classes = len(SYNTHETIC_CLASSES)
    necks = model.neck if isinstance(model.neck, list) else [model.neck]
    if model.backbone.type == 'CSPNeXt':
        # 1/8 of the P5 widths: stages 3-5 give 32, 64 and 128 channels.
        model.backbone.update(widen_factor=0.125, init_cfg=None)
        necks[0].update(in_channels=[32, 64, 128], out_channels=channels)
    else:
        model.backbone.update(depth=18, base_channels=8, init_cfg=None)
        necks[0].update(in_channels=[8, 16, 32, 64], out_channels=channels)
    for neck in necks[1:]:
        neck.update(in_channels=channels, out_channels=channels)
    if 'bbox_head' in model:
        model.bbox_head.update(
            num_classes=num_classes,
            in_channels=channels,
            feat_channels=channels,
        )
        if model.bbox_head.type == 'RepPointsHead':
            model.bbox_head.point_feat_channels = channels
        model.test_cfg.score_thr = 0.0
    else:
        model.rpn_head.update(in_channels=channels, feat_channels=channels)
        roi = model.roi_head
        roi.bbox_roi_extractor.out_channels = channels
        # Cascade R-CNN lists one box head per stage.
        stages = roi.bbox_head
        for head in stages if isinstance(stages, list) else [stages]:
            head.update(num_classes=num_classes, in_channels=channels)
            # None (TaskAttnBBoxHead in the Fig. 2c configs) means no FC
            # layer, and stays so.
            if head.get('fc_out_channels') is not None:
                head.fc_out_channels = 64
        if 'mask_head' in roi:
            roi.mask_roi_extractor.out_channels = channels
            roi.mask_head.update(
                num_classes=num_classes,
                in_channels=channels,
                conv_out_channels=channels,
            )
        model.test_cfg.rcnn.score_thr = 0.0


def tiny_detector_cfg(
    config_file: str,
    data: Dict[str, str],
    work_dir: str,
    iters: int = 6,
    image: int = 64,
    batch_size: int = 2,
    lr: Optional[float] = 0.05,
    checkpoint_interval: Optional[int] = None,
) -> Config:
    """Load ``config_file`` as a user would and shrink it for ``data``.

    Args:
        config_file (str): A detector config (this package's or mmdet's).
        data (dict): What :func:`generate_synthetic_coco` returned.
        work_dir (str): The run's work dir (also for the detection dumps).
        iters (int): Training iterations (``IterBasedTrainLoop``).
        image (int): Images are resized to fit ``image`` x ``image``.
        batch_size (int): Train and test batch size.
        lr (float, optional): Learning rate; None keeps the config's.
        checkpoint_interval (int, optional): Save every N iterations; None
            saves nothing.

    Returns:
        Config: Deterministic (seed 0, no random augmentation, no warm-up).
    """
    cfg = Config.fromfile(config_file)
    shrink_model(cfg.model)
    # Instance segmentation (a mask head): train on the masks, test both.
    masks = 'mask_head' in cfg.model.get('roi_head', {})
    train_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', with_bbox=True, with_mask=masks),
        dict(type='Resize', scale=(image, image), keep_ratio=True),
        dict(type='PackDetInputs'),
    ]
    test_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(image, image), keep_ratio=True),
        dict(type='LoadAnnotations', with_bbox=True, with_mask=masks),
        dict(type='PackDetInputs', meta_keys=TEST_META_KEYS),
    ]

    def loader(split, pipeline):
        # InfiniteSampler: the iteration loop would otherwise sleep 2 s at
        # every restart of a one-batch loader.
        sampler = 'InfiniteSampler' if split == 'train' else 'DefaultSampler'
        return dict(
            batch_size=batch_size,
            num_workers=0,
            persistent_workers=False,
            sampler=dict(type=sampler, shuffle=False),
            batch_sampler=None,
            dataset=dict(
                type='CocoDataset',
                data_root=data['data_root'],
                ann_file=data[f'{split}_ann'],
                data_prefix=dict(img=data[f'{split}_img_dir'] + '/'),
                metainfo=dict(classes=SYNTHETIC_CLASSES),
                filter_cfg=dict(filter_empty_gt=split == 'train'),
                test_mode=split != 'train',
                pipeline=pipeline,
            ),
        )

    cfg.train_dataloader = loader('train', train_pipeline)
    cfg.val_dataloader = cfg.test_dataloader = loader('val', test_pipeline)
    cfg.val_evaluator = cfg.test_evaluator = dict(
        type='CocoMetric',
        ann_file=data['val_ann'],
        metric=['bbox', 'segm'] if masks else 'bbox',
        outfile_prefix=osp.join(work_dir, 'dets'),
    )
    cfg.train_cfg = dict(
        type='IterBasedTrainLoop', max_iters=iters, val_interval=iters + 1
    )
    # Keep the family's optimizer; drop the 500-iteration warm-up, which
    # would hold the learning rate near zero for the whole run.
    cfg.param_scheduler = []
    if lr is not None:
        cfg.optim_wrapper.optimizer.lr = lr
    cfg.optim_wrapper.clip_grad = dict(max_norm=10, norm_type=2)
    cfg.default_hooks.checkpoint = (
        dict(
            type='CheckpointHook', by_epoch=False, interval=checkpoint_interval
        )
        if checkpoint_interval
        else None
    )
    cfg.default_hooks.logger.interval = 1
    cfg.log_processor = dict(by_epoch=False)
    cfg.log_level = 'WARNING'
    cfg.work_dir = work_dir
    cfg.randomness = dict(seed=0)
    cfg.visualizer.vis_backends = []
    return cfg
