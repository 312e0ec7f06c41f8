"""Every Table 3 detector, baseline and +DyHead, trained and evaluated.

Each shipped config is loaded as a user would, then shrunk (ResNet-18 with
8 base channels, 32-channel pyramid, 64 px synthetic images) and run through
mmengine's Runner: a few SGD iterations on one fixed batch (the loss must go
down) and a test pass whose CocoMetric result is checked against
pycocotools run directly on the dumped detections. Also unit tests of
TaskAttnBBoxHead (paper Fig. 2c) against Eq. 5 written out.
"""

import json
import os.path as osp

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mmdet_dyhead.models.necks import DyHeadNeck
from mmdet_dyhead.models.roi_heads import TaskAttnBBoxHead
from projects.synthetic_coco import generate_synthetic_coco, tiny_detector_cfg
from tests.helpers import REPO_ROOT

CFG = osp.join(REPO_ROOT, 'configs')
# Table 3 of the paper: (family, baseline config, +DyHead config(s)).
TABLE3 = {
    'faster_rcnn': [
        'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
        'faster_rcnn/faster-rcnn_r50_fpn_dyhead-6b-scale-spatial_'
        'task-attn-roi-head_1x_coco.py',
    ],
    'retinanet': [
        'retinanet/retinanet_r50_fpn_1x_coco.py',
        'retinanet/retinanet_r50_fpn_dyhead-6b_1x_coco.py',
    ],
    'atss': [
        'atss/atss_r50_fpn_1x_coco.py',
        'atss/atss_r50_fpn_dyhead-6b_1x_coco.py',
    ],
    'fcos': [
        'fcos/fcos_r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_'
        '1x_coco.py',
        'fcos/fcos_r50-caffe_fpn_dyhead-6b-center-normbbox-centeronreg-giou_'
        '1x_coco.py',
    ],
    'reppoints': [
        'reppoints/reppoints-moment_r50_fpn-gn_head-gn_1x_coco.py',
        'reppoints/reppoints-moment_r50_fpn-gn_dyhead-6b_1x_coco.py',
    ],
}
E2E_CONFIGS = [c for pair in TABLE3.values() for c in pair]

IMAGE = 64
ITERS = 6


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    # Two training images = one fixed batch: the loss must fall when the
    # same batch is seen again, which makes a short run a reliable check.
    return generate_synthetic_coco(
        str(tmp_path_factory.mktemp('synthetic')),
        num_train=2,
        num_val=2,
        image_size=IMAGE,
        seed=0,
        objects_per_image=(2, 3),
        size_range=(0.25, 0.7),
    )


def _tiny_cfg(rel_path: str, data: dict, work_dir: str) -> Config:
    return tiny_detector_cfg(
        osp.join(CFG, rel_path), data, work_dir, iters=ITERS, image=IMAGE
    )


class _LossRecorder(Hook):
    priority = 'LOWEST'

    def __init__(self):
        self.losses = []

    def after_train_iter(
        self, runner, batch_idx, data_batch=None, outputs=None
    ):
        self.losses.append(float(outputs['loss']))


def _pycocotools_ap(ann_file: str, det_file: str) -> float:
    gt = COCO(ann_file)
    with open(det_file) as f:
        dets = json.load(f)
    ev = COCOeval(gt, gt.loadRes(dets), 'bbox')
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    'config', E2E_CONFIGS, ids=[osp.basename(c)[:-3] for c in E2E_CONFIGS]
)
def test_train_step_and_coco_evaluation(config, data, tmp_path):
    cfg = _tiny_cfg(config, data, str(tmp_path))
    runner = Runner.from_cfg(cfg)
    model = runner.model
    assert any(isinstance(m, DyHeadNeck) for m in model.modules()) == (
        'dyhead' in config
    )
    recorder = _LossRecorder()
    runner.register_hook(recorder)
    runner.train()

    losses = recorder.losses
    assert len(losses) == ITERS and all(
        map(torch.isfinite, torch.tensor(losses))
    )
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.97 * first, f'loss did not decrease: {losses}'

    metrics = runner.test()
    assert 0.0 <= metrics['coco/bbox_mAP'] <= 1.0
    # mmdet's CocoMetric must agree with pycocotools on the same detections
    # (mmdet rounds to 3 decimals).
    ref = _pycocotools_ap(data['val_ann'], str(tmp_path / 'dets.bbox.json'))
    assert metrics['coco/bbox_mAP'] == pytest.approx(max(ref, 0.0), abs=6e-4)


@pytest.mark.slow
def test_table5_test_time_augmentation_runs_through_mmdet_tta(data, tmp_path):
    """The Table 5 config's tta_model / tta_pipeline, wrapped the way mmdet's
    ``tools/test.py --tta`` does, on a tiny ATSS + DyHead (scales / 10)."""
    tta_src = Config.fromfile(
        osp.join(
            CFG,
            'atss/atss_x101-64x4d-mdconv-c3-c5_fpn_dyhead-6b_ms-2x_coco.py',
        )
    )
    cfg = _tiny_cfg(
        'atss/atss_r50_fpn_dyhead-6b_1x_coco.py', data, str(tmp_path)
    )
    pipeline = tta_src.tta_pipeline
    resizes = pipeline[1].transforms[0]
    assert len(resizes) == len(tta_src.tta_scales)
    for resize in resizes:
        resize.scale = tuple(s // 10 for s in resize.scale)
    cfg.model = dict(tta_src.tta_model, module=cfg.model)
    cfg.test_dataloader.dataset.pipeline = pipeline
    runner = Runner.from_cfg(cfg)
    assert type(runner.model).__name__ == 'DetTTAModel'
    metrics = runner.test()
    ref = _pycocotools_ap(data['val_ann'], str(tmp_path / 'dets.bbox.json'))
    assert metrics['coco/bbox_mAP'] == pytest.approx(max(ref, 0.0), abs=6e-4)


# ------------------------------------------------ TaskAttnBBoxHead (Fig. 2c)


def _hsig(x):
    return torch.clamp(x + 3, 0, 6) / 6


def _task_attention_eq5(x, fc1, fc2):
    """Eq. 5 with theta = GAP -> FC -> ReLU -> FC -> hard sigmoid - 0.5."""
    c = x.shape[1]
    pooled = x.mean(dim=(2, 3))
    hidden = torch.relu(pooled @ fc1.weight.flatten(1).t() + fc1.bias)
    y = _hsig(hidden @ fc2.weight.flatten(1).t() + fc2.bias) - 0.5
    a1, b1, a2, b2 = (y[:, i * c : (i + 1) * c, None, None] for i in range(4))
    return torch.maximum(x * (2 * a1 + 1) + b1, x * (2 * a2) + b2)


def test_task_attn_bbox_head_matches_eq5_then_linear_predictors():
    head = TaskAttnBBoxHead(
        in_channels=16,
        roi_feat_size=5,
        num_classes=3,
        num_task_attn=2,
        task_attn_ratio=4,
    )
    head.init_weights()
    for attn in head.task_attns:  # away from the near-identity init
        for fc in (attn.fc1, attn.fc2):
            nn.init.normal_(fc.weight, std=0.5)
            nn.init.normal_(fc.bias, std=0.5)
    nn.init.normal_(head.fc_cls.weight)
    nn.init.normal_(head.fc_reg.weight)
    rois = torch.randn(7, 16, 5, 5)
    cls_score, bbox_pred = head(rois)
    assert cls_score.shape == (7, 4) and bbox_pred.shape == (7, 12)

    ref = rois
    for attn in head.task_attns:
        ref = _task_attention_eq5(ref, attn.fc1, attn.fc2)
    ref = ref.flatten(1)
    ref_cls = ref @ head.fc_cls.weight.t() + head.fc_cls.bias
    ref_reg = ref @ head.fc_reg.weight.t() + head.fc_reg.bias
    torch.testing.assert_close(cls_score, ref_cls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bbox_pred, ref_reg, rtol=1e-5, atol=1e-5)
    # The attention is not a no-op: a plain ReLU gives something else.
    plain = head.fc_cls(torch.relu(rois).flatten(1))
    assert not torch.allclose(plain, cls_score, atol=1e-2)

    # Zero RoIs (an image without proposals) still give well-shaped outputs.
    empty_cls, empty_reg = head(torch.zeros(0, 16, 5, 5))
    assert empty_cls.shape == (0, 4) and empty_reg.shape == (0, 12)


def test_task_attn_bbox_head_starts_near_relu_and_builds_from_config():
    from mmdet_dyhead.registry import MODELS

    head = MODELS.build(
        dict(
            type='TaskAttnBBoxHead',
            in_channels=16,
            roi_feat_size=7,
            num_classes=5,
            reg_class_agnostic=True,
        )
    )
    head.init_weights()
    rois = torch.randn(3, 16, 7, 7)
    x = rois
    for attn in head.task_attns:
        x = attn(x)
    # Small FC weights: hard sigmoid ~ 0.5, so a1 ~ 1, a2, b ~ 0: a ReLU.
    assert (x - torch.relu(rois)).abs().max() < 0.05
    cls_score, bbox_pred = head(rois)
    assert cls_score.shape == (3, 6) and bbox_pred.shape == (3, 4)


@pytest.mark.parametrize(
    'kwargs,message',
    [
        (dict(num_task_attn=0), 'num_task_attn must be an integer >= 1'),
        (dict(task_attn_ratio=3), 'not divisible by task_attn_ratio=3'),
    ],
)
def test_task_attn_bbox_head_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TaskAttnBBoxHead(in_channels=16, num_classes=3, **kwargs)


def test_task_attn_bbox_head_rejects_wrong_roi_channels():
    head = TaskAttnBBoxHead(in_channels=16, num_classes=3)
    with pytest.raises(ValueError, match='bbox_head.in_channels'):
        head(torch.randn(2, 32, 7, 7))
