"""The package's tools/train.py and tools/test.py, run as a user runs them.

They run mmdet's scripts with the package's opt-in steps around them. The
detector is mmdet's own RetinaNet config (no DyHead, no ``custom_imports``),
shrunk: whatever the tools add must leave a plain detector's training,
resuming and testing exact.
"""

import copy
import glob
import os.path as osp
import pickle
import shutil

import numpy as np
import pytest
import torch
from mmengine.config import Config

from mmdet_dyhead.checkpoint import mmengine_safe_globals
from mmdet_dyhead.cli import test as test_tool
from mmdet_dyhead.cli import train as train_tool
from projects.synthetic_coco import (
    generate_synthetic_coco,
    mmdet_config_path,
    tiny_detector_cfg,
)
from tests.helpers import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures('one_thread')]

RETINANET = mmdet_config_path('retinanet/retinanet_r50_fpn_1x_coco.py')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return generate_synthetic_coco(
        str(tmp_path_factory.mktemp('synthetic')),
        num_train=4,
        num_val=2,
        image_size=64,
        seed=0,
        objects_per_image=(2, 3),
        size_range=(0.25, 0.7),
    )


def write_cfg(cfg: Config, path, name: str) -> str:
    cfg = copy.deepcopy(cfg)
    cfg.experiment_name = name  # one logger per in-process run
    cfg.dump(str(path))
    return str(path)


def retinanet_cfg(data, work_dir, **kwargs) -> Config:
    return tiny_detector_cfg(RETINANET, data, str(work_dir), **kwargs)


def load_ckpt(path):
    with mmengine_safe_globals():
        return torch.load(path, map_location='cpu', weights_only=True)


@pytest.fixture(scope='module')
def trained(data, tmp_path_factory):
    """4 iterations of RetinaNet through tools/train.py, saved every 2."""
    work = tmp_path_factory.mktemp('train_a')
    cfg = retinanet_cfg(data, work, iters=4, checkpoint_interval=2)
    train_tool.main([write_cfg(cfg, work / 'cfg.py', 'train_a')])
    return cfg, work


def test_resume_from_a_hex_named_checkpoint_continues_bit_exactly(
    data, trained, tmp_path
):
    cfg, work_a = trained
    work_b = tmp_path / 'train_b'
    work_b.mkdir()
    resume_from = work_b / 'iter_2-deadbeef.pth'
    shutil.copy(work_a / 'iter_2.pth', resume_from)
    cfg_b = copy.deepcopy(cfg)
    cfg_b.work_dir = str(work_b)
    train_tool.main(
        [
            write_cfg(cfg_b, tmp_path / 'cfg_b.py', 'train_b'),
            '--resume',
            str(resume_from),
        ]
    )
    straight, resumed = (
        load_ckpt(work_a / 'iter_4.pth'),
        load_ckpt(work_b / 'iter_4.pth'),
    )
    assert resumed['meta']['iter'] == straight['meta']['iter'] == 4
    for key, value in straight['state_dict'].items():
        assert torch.equal(resumed['state_dict'][key], value), key
    for a, b in zip(
        straight['optimizer']['state'].values(),
        resumed['optimizer']['state'].values(),
    ):
        assert torch.equal(a['momentum_buffer'], b['momentum_buffer'])


def test_mmengine_checkpoints_need_the_allow_list_outside_the_tools(trained):
    """What mmdet's unchanged tools meet under torch's weights_only default
    (docs/user_guide.md): the allow-list exists only inside the tools."""
    _, work = trained
    with pytest.raises(pickle.UnpicklingError, match='HistoryBuffer'):
        torch.load(work / 'iter_4.pth', weights_only=True)


def predictions(path):
    with open(path, 'rb') as f:
        results = pickle.load(f)
    out = []
    for result in results:
        pred = result['pred_instances']
        rows = np.concatenate(
            [
                pred['labels'].numpy()[:, None],
                pred['scores'].numpy()[:, None],
                pred['bboxes'].numpy(),
            ],
            axis=1,
        )
        out.append(rows[np.lexsort(rows.T[::-1])])
    return out


def test_tta_evaluates_the_loaded_checkpoint(data, trained, tmp_path):
    cfg, work = trained
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = str(tmp_path)
    # one scale, no flip: TTA must reproduce the plain predictions
    cfg.tta_model = dict(
        type='DetTTAModel',
        tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100),
    )
    cfg.tta_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(
            type='TestTimeAug',
            transforms=[
                [dict(type='Resize', scale=(64, 64), keep_ratio=True)],
                [dict(type='RandomFlip', prob=0.0)],
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
    ckpt = str(work / 'iter_4.pth')
    # a checkpoint of the same detector, never trained
    fresh = tmp_path / 'fresh.pth'
    from mmdet.registry import MODELS

    model = MODELS.build(cfg.model)
    model.init_weights()
    torch.save({'state_dict': model.state_dict()}, fresh)

    runs = {
        'plain': [ckpt],
        'tta': [ckpt, '--tta'],
        'tta_fresh': [str(fresh), '--tta'],
    }
    preds = {}
    for name, args in runs.items():
        out = str(tmp_path / f'{name}.pkl')
        test_tool.main(
            [write_cfg(cfg, tmp_path / f'{name}.py', name)]
            + args
            + ['--out', out]
        )
        preds[name] = predictions(out)
    assert len(preds['tta']) == len(preds['plain']) == 2
    for tta, plain, fresh_ in zip(
        preds['tta'], preds['plain'], preds['tta_fresh']
    ):
        np.testing.assert_allclose(tta, plain, rtol=1e-5, atol=1e-4)
        assert tta.shape != fresh_.shape or not np.allclose(tta, fresh_)


def log_text(work_dir) -> str:
    logs = sorted(glob.glob(osp.join(str(work_dir), '*', '*.log')))
    assert logs, f'no log in {work_dir}'
    with open(logs[-1]) as f:
        return f.read()


# At 64 px (a 1x1 P7) torch 2.13's CPU bfloat16 autocast returned weight
# gradients of 1e25 for RetinaNet's P7 conv, with or without this package;
# 96 px keeps every level at 2x2 or more.
AMP_IMAGE = 96


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_amp_without_a_gpu_trains_with_cpu_autocast(data, tmp_path, dtype):
    cfg = retinanet_cfg(
        data, tmp_path, iters=2, checkpoint_interval=2, image=AMP_IMAGE
    )
    cfg.log_level = 'INFO'
    args = [write_cfg(cfg, tmp_path / 'cfg.py', f'amp_{dtype}'), '--amp']
    if dtype == 'float16':
        args += ['--cfg-options', 'optim_wrapper.dtype=float16']
    train_tool.main(args)
    text = log_text(tmp_path)
    assert f'CPUAmpOptimWrapper: CPU autocast in torch.{dtype}' in text
    assert 'grad_norm: nan' not in text and 'loss: nan' not in text
    state = load_ckpt(tmp_path / 'iter_2.pth')
    assert all(torch.isfinite(v).all() for v in state['state_dict'].values())
    scaler = state['optimizer'].get('loss_scaler', {})
    # float16 gradients are scaled by default, bfloat16 ones are not
    assert bool(scaler) == (dtype == 'float16')


def test_amp_loss_scale_is_honoured_for_bfloat16(data, tmp_path):
    cfg = retinanet_cfg(
        data, tmp_path, iters=2, checkpoint_interval=2, image=AMP_IMAGE
    )
    cfg.optim_wrapper.type = 'AmpOptimWrapper'
    cfg.optim_wrapper.loss_scale = 512.0
    cfg.log_level = 'INFO'
    train_tool.main([write_cfg(cfg, tmp_path / 'cfg.py', 'amp_static')])
    assert 'loss scaling 512.0' in log_text(tmp_path)
    scaler = load_ckpt(tmp_path / 'iter_2.pth')['optimizer']['loss_scaler']
    assert scaler['scale'] == 512.0


def test_a_dyhead_config_without_custom_imports_is_refused(data, tmp_path):
    cfg = tiny_detector_cfg(
        osp.join(REPO_ROOT, 'configs/atss/atss_r50_fpn_dyhead-6b_1x_coco.py'),
        data,
        str(tmp_path),
    )
    plain = cfg.to_dict()
    del plain['custom_imports']
    config = write_cfg(Config(plain), tmp_path / 'cfg.py', 'no_imports')
    for tool in (train_tool, test_tool):
        with pytest.raises(SystemExit) as err:
            tool.main([config, 'ckpt.pth'][: 1 if tool is train_tool else 2])
        text = str(err.value)
        assert 'DyHeadCheckHook' in text and 'DyHeadNeck' in text
        assert "custom_imports = dict(imports=['mmdet_dyhead']" in text
