"""Helpers shared by the tests (fixtures live in conftest.py).

Import them as ``from tests.helpers import ...``; pytest loads conftest.py
itself, so no test imports it.
"""

import os
import os.path as osp

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error used across the tests."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def pyramid(
    batch=2,
    channels=32,
    size=(40, 56),
    levels=5,
    dtype=torch.float32,
    requires_grad=False,
):
    """A random feature pyramid whose level l+1 is ceil(level l / 2)."""
    feats = []
    h, w = size
    for _ in range(levels):
        feats.append(
            torch.randn(
                batch, channels, h, w, dtype=dtype, requires_grad=requires_grad
            )
        )
        h, w = (h + 1) // 2, (w + 1) // 2
    return feats


def subprocess_env():
    """Environment for child processes that must import this source tree."""
    env = dict(os.environ)
    env['PYTHONPATH'] = REPO_ROOT + os.pathsep + env.get('PYTHONPATH', '')
    return env


TRAIN_BASE_CONFIG = osp.join(
    REPO_ROOT, 'configs/atss/atss_r50_fpn_dyhead-6b_1x_coco.py'
)

TRAIN_CONFIG = """
_base_ = {base!r}
custom_imports = dict(imports=['mmdet_dyhead'],
                      allow_failed_imports=False)
data_root = {data_root!r}
classes = {classes!r}
model = dict(
    backbone=dict(depth=18, base_channels=8, out_indices=(1, 2, 3),
                  frozen_stages=-1, norm_eval=False, init_cfg=None),
    neck=[
        dict(type='FPN', in_channels=[16, 32, 64], out_channels=32,
             start_level=0, add_extra_convs='on_output', num_outs=5),
        dict(type='DyHeadNeck', in_channels=32, out_channels=32, num_blocks=2,
             num_levels=5,
             norm_cfg=dict(type='GN', num_groups=8, requires_grad=True)),
    ],
    bbox_head=dict(num_classes=len(classes), in_channels=32, feat_channels=32))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes),
                 ann_file='annotations/instances_train.json',
                 data_prefix=dict(img='train/'), pipeline=train_pipeline))
val_dataloader = val_cfg = val_evaluator = None
test_dataloader = test_cfg = test_evaluator = None
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=3)
param_scheduler = []
optim_wrapper = dict(optimizer=dict(lr=0.001))
default_hooks = dict(checkpoint=dict(by_epoch=False, interval=3),
                     logger=dict(interval=1))
log_processor = dict(by_epoch=False)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
"""


def write_train_config(tmp_path, num_train=8):
    """Synthetic data in tmp_path/data and a 3-iteration config for it."""
    from projects.synthetic_coco import (
        SYNTHETIC_CLASSES,
        generate_synthetic_coco,
    )

    data = generate_synthetic_coco(
        str(tmp_path / 'data'), num_train=num_train, num_val=2, image_size=64
    )
    config = tmp_path / 'train_cfg.py'
    config.write_text(
        TRAIN_CONFIG.format(
            base=TRAIN_BASE_CONFIG,
            data_root=data['data_root'] + '/',
            classes=tuple(SYNTHETIC_CLASSES),
        )
    )
    return config


def train_tiny_dyhead(root, name: str):
    """A tiny ATSS + DyHead trained for 2 iterations by the package's
    tools/train.py on synthetic data in ``root``.

    Args:
        root (Path): An empty folder.
        name (str): The run's experiment name (one logger per in-process
            run).

    Returns:
        tuple: ``(data, cfg, config file, checkpoint file)``.
    """
    from mmdet_dyhead.cli import train as train_tool
    from projects.synthetic_coco import (
        generate_synthetic_coco,
        tiny_detector_cfg,
    )

    data = generate_synthetic_coco(
        str(root / 'data'),
        num_train=2,
        num_val=2,
        image_size=64,
        objects_per_image=(2, 3),
    )
    cfg = tiny_detector_cfg(
        osp.join(REPO_ROOT, 'configs/atss/atss_r50_fpn_dyhead-6b_1x_coco.py'),
        data,
        str(root / 'work'),
        iters=2,
        checkpoint_interval=2,
    )
    cfg.experiment_name = name
    config = str(root / 'tiny_atss_dyhead.py')
    cfg.dump(config)
    train_tool.main([config])
    return data, cfg, config, str(root / 'work' / 'iter_2.pth')
