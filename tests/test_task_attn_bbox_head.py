"""TaskAttnBBoxHead as a drop-in for mmdet's Shared2FCBBoxHead.

Changing only ``roi_head.bbox_head.type`` in mmdet's own Faster R-CNN config
builds a detector that trains (one optimizer step on a synthetic image) and
predicts; the checks of mmdet's bbox-head unit test (construction,
``predict_by_feat`` with and without NMS and with no RoIs,
``refine_bboxes``) hold for the head; ConvFCBBoxHead's arguments mean what
the class docstring says, and the ones the head cannot honour are refused
by name. The shipped Fig. 2c configs keep their checkpoint format.
"""

import os.path as osp

import pytest
import torch
from mmdet.models.task_modules.samplers import SamplingResult
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmengine.config import Config, ConfigDict
from mmengine.optim import OptimWrapper
from mmengine.registry import init_default_scope
from mmengine.structures import InstanceData

from mmdet_dyhead.models.roi_heads import TaskAttnBBoxHead
from projects.synthetic_coco import mmdet_config_path
from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.usefixtures('one_thread')
MMDET_FASTER = 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
FIG2C = 'dyhead-6b-scale-spatial_task-attn-roi-head'


@pytest.fixture(autouse=True)
def _mmdet_scope():
    init_default_scope('mmdet')


def _reference_forward(head, rois):
    """The head written out: attentions, flatten, optional FC + ReLU,
    linear predictors."""
    x = rois
    for attn in head.task_attns:
        a1, b1, a2, b2 = attn.coefficients(x)
        x = torch.maximum(x * a1 + b1, x * a2 + b2)
    x = x.flatten(1)
    if head.fc_out_channels is not None:
        x = torch.relu(x @ head.out_fc.weight.t() + head.out_fc.bias)
    return (
        x @ head.fc_cls.weight.t() + head.fc_cls.bias,
        x @ head.fc_reg.weight.t() + head.fc_reg.bias,
    )


def _randomize(head):
    with torch.no_grad():  # away from the near-ReLU init
        for p in head.parameters():
            p.normal_(0, 0.3)


# ------------------------------------------- mmdet's config, type swapped


def test_type_swap_in_mmdets_faster_rcnn_trains_and_predicts():
    cfg = Config.fromfile(mmdet_config_path(MMDET_FASTER))
    assert cfg.model.roi_head.bbox_head.type == 'Shared2FCBBoxHead'
    cfg.model.roi_head.bbox_head.type = 'TaskAttnBBoxHead'  # the only change
    model = MODELS.build(cfg.model)
    head = model.roi_head.bbox_head
    assert isinstance(head, TaskAttnBBoxHead)
    # Shared2FCBBoxHead's two FC layers became two attentions; its
    # fc_out_channels=1024 is the width the predictors read.
    assert len(head.task_attns) == 2
    assert head.out_fc.in_features == 256 * 7 * 7
    assert head.out_fc.out_features == 1024
    assert head.fc_cls.in_features == head.fc_reg.in_features == 1024
    assert (head.fc_cls.out_features, head.fc_reg.out_features) == (81, 320)

    g = torch.Generator().manual_seed(0)
    image = (torch.rand(3, 96, 128, generator=g) * 255).to(torch.uint8)
    sample = DetDataSample(
        metainfo=dict(
            img_id=0,
            img_shape=(96, 128),
            ori_shape=(96, 128),
            scale_factor=(1.0, 1.0),
        )
    )
    sample.gt_instances = InstanceData(
        bboxes=torch.tensor(
            [[10.0, 12.0, 70.0, 80.0], [60.0, 20.0, 120.0, 60.0]]
        ),
        labels=torch.tensor([3, 17]),
    )
    data = dict(inputs=[image], data_samples=[sample])

    model.train()
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01))
    before = [p.detach().clone() for p in head.task_attns[0].parameters()]
    torch.manual_seed(0)
    log_vars = model.train_step(data, optim)
    assert {'loss_cls', 'loss_bbox', 'loss_rpn_cls'} <= set(log_vars)
    assert all(torch.isfinite(torch.as_tensor(v)) for v in log_vars.values())
    after = list(head.task_attns[0].parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))

    model.eval()
    (pred,) = model.val_step(data)
    det = pred.pred_instances
    assert det.bboxes.shape[1:] == (4,)
    assert len(det.bboxes) == len(det.scores) == len(det.labels)
    assert len(det.bboxes) <= cfg.model.test_cfg.rcnn.max_per_img


USER_CONFIG = """\
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdet_dyhead'], allow_failed_imports=False)
model = dict(roi_head=dict(bbox_head=dict(type='TaskAttnBBoxHead')))
"""


@pytest.mark.slow
def test_type_swap_trains_through_the_runner(tmp_path):
    """The user guide's config (mmdet's Faster R-CNN, the type swapped),
    shrunk and trained as tools/train.py trains it: the loss falls on a
    fixed batch and the test pass gives detections."""
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    from projects.synthetic_coco import (
        generate_synthetic_coco,
        tiny_detector_cfg,
    )

    class Losses(Hook):
        priority = 'LOWEST'

        def __init__(self):
            self.values = []

        def after_train_iter(
            self, runner, batch_idx, data_batch=None, outputs=None
        ):
            self.values.append(float(outputs['loss']))

    config = tmp_path / 'my_config.py'
    config.write_text(USER_CONFIG)
    data = generate_synthetic_coco(
        str(tmp_path / 'data'),
        num_train=2,
        num_val=2,
        image_size=64,
        seed=0,
        objects_per_image=(2, 3),
        size_range=(0.25, 0.7),
    )
    cfg = tiny_detector_cfg(str(config), data, str(tmp_path / 'work'))
    runner = Runner.from_cfg(cfg)
    head = runner.model.roi_head.bbox_head
    assert isinstance(head, TaskAttnBBoxHead) and head.out_fc is not None
    losses = Losses()
    runner.register_hook(losses)
    runner.train()
    assert all(map(torch.isfinite, torch.tensor(losses.values)))
    first, last = sum(losses.values[:2]) / 2, sum(losses.values[-2:]) / 2
    assert last < 0.97 * first, f'loss did not decrease: {losses.values}'
    metrics = runner.test()
    assert 'coco/bbox_mAP' in metrics


# ------------------------------------- mmdet's bbox-head unit test checks


def test_init_from_shared2fc_arguments():
    # The arguments of mmdet's test of Shared2FCBBoxHead (16 channels: the
    # attention squeezes by 4).
    head = MODELS.build(
        dict(
            type='TaskAttnBBoxHead',
            in_channels=16,
            fc_out_channels=8,
            num_classes=4,
        )
    )
    assert head.fc_cls and head.fc_reg
    assert len(head.task_attns) == 2
    assert (head.fc_cls.in_features, head.fc_cls.out_features) == (8, 5)
    assert (head.fc_reg.in_features, head.fc_reg.out_features) == (8, 16)
    # ConvFCBBoxHead's count of shared FC layers is the attentions' count.
    head = TaskAttnBBoxHead(in_channels=16, num_classes=4, num_shared_fcs=1)
    assert len(head.task_attns) == 1 and head.out_fc is None
    assert head.fc_cls.in_features == 16 * 7 * 7
    head = TaskAttnBBoxHead(
        in_channels=16, num_classes=4, num_shared_fcs=3, num_task_attn=3
    )
    assert len(head.task_attns) == 3


@pytest.mark.parametrize('fc_out_channels', [None, 8])
@pytest.mark.parametrize('with_avg_pool', [False, True])
def test_forward_matches_the_head_written_out(fc_out_channels, with_avg_pool):
    head = TaskAttnBBoxHead(
        in_channels=16,
        roi_feat_size=5,
        num_classes=3,
        fc_out_channels=fc_out_channels,
        with_avg_pool=with_avg_pool,
    )
    head.init_weights()
    _randomize(head)
    rois = torch.randn(6, 16, 5, 5)
    cls_score, bbox_pred = head(rois)
    assert cls_score.shape == (6, 4) and bbox_pred.shape == (6, 12)
    if with_avg_pool:
        # Pooling commutes with nothing here: pool the attended RoI.
        x = rois
        for attn in head.task_attns:
            a1, b1, a2, b2 = attn.coefficients(x)
            x = torch.maximum(x * a1 + b1, x * a2 + b2)
        x = x.mean(dim=(2, 3))
        if fc_out_channels is not None:
            x = torch.relu(head.out_fc(x))
        ref = (head.fc_cls(x), head.fc_reg(x))
    else:
        ref = _reference_forward(head, rois)
    torch.testing.assert_close(cls_score, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bbox_pred, ref[1], rtol=1e-5, atol=1e-5)
    empty_cls, empty_reg = head(torch.zeros(0, 16, 5, 5))
    assert empty_cls.shape == (0, 4) and empty_reg.shape == (0, 12)


def test_out_fc_is_initialised_like_convfc_fcs():
    head = TaskAttnBBoxHead(in_channels=16, num_classes=3, fc_out_channels=64)
    with torch.no_grad():
        head.out_fc.bias.fill_(1.0)
    head.init_weights()
    # Xavier uniform: |w| <= sqrt(6 / (fan_in + fan_out)), zero bias.
    bound = (6 / (16 * 49 + 64)) ** 0.5
    assert head.out_fc.weight.abs().max() <= bound
    assert head.out_fc.weight.std() > bound / 3
    assert torch.count_nonzero(head.out_fc.bias) == 0
    # The predictors keep BBoxHead's init (normal, std 0.01 and 0.001).
    assert head.fc_cls.weight.std().item() == pytest.approx(0.01, rel=0.2)
    assert head.fc_reg.weight.std().item() == pytest.approx(0.001, rel=0.2)


def _rois(n, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size / 2
    wh = torch.rand(n, 2, generator=g) * size / 2 + 4
    return torch.cat([torch.zeros(n, 1), xy, xy + wh], 1)


@pytest.mark.parametrize('num_rois', [2, 0])
def test_predict_by_feat_on_the_heads_outputs(num_rois):
    num_classes = 6
    head = TaskAttnBBoxHead(
        in_channels=16,
        num_classes=num_classes,
        reg_class_agnostic=True,
        fc_out_channels=8,
    )
    head.init_weights()
    rois = _rois(num_rois)
    cls_score, bbox_pred = head(torch.randn(num_rois, 16, 7, 7))
    metas = [dict(img_shape=(128, 128), scale_factor=(1.0, 1.0))]

    rcnn_test_cfg = ConfigDict(
        score_thr=0.0, nms=dict(type='nms', iou_threshold=0.5), max_per_img=100
    )
    (res,) = head.predict_by_feat(
        rois=(rois,),
        cls_scores=(cls_score,),
        bbox_preds=(bbox_pred,),
        batch_img_metas=metas,
        rcnn_test_cfg=rcnn_test_cfg,
    )
    assert isinstance(res, InstanceData)
    assert len(res) <= num_rois * num_classes
    assert res.bboxes.shape[1:] == (4,)
    assert res.scores.dim() == res.labels.dim() == 1

    # Without NMS: one decoded box and the softmax scores per RoI.
    (res,) = head.predict_by_feat(
        rois=(rois,),
        cls_scores=(cls_score,),
        bbox_preds=(bbox_pred,),
        batch_img_metas=metas,
    )
    assert len(res) == num_rois
    if num_rois:  # per-class scores, no labels yet
        assert res.get('labels') is None
    assert res.scores.shape == cls_score.shape
    torch.testing.assert_close(res.scores, cls_score.softmax(-1))
    stds = torch.tensor([0.1, 0.1, 0.2, 0.2])
    d = bbox_pred * stds
    w, h = rois[:, 3] - rois[:, 1], rois[:, 4] - rois[:, 2]
    cx = rois[:, 1] + 0.5 * w + d[:, 0] * w
    cy = rois[:, 2] + 0.5 * h + d[:, 1] * h
    w, h = w * d[:, 2].exp(), h * d[:, 3].exp()
    ref = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    torch.testing.assert_close(
        res.bboxes, ref.clamp(0, 128), rtol=1e-4, atol=1e-4
    )


def test_refine_bboxes_on_the_heads_outputs():
    num_classes, n = 6, 20
    head = TaskAttnBBoxHead(
        in_channels=16, num_classes=num_classes, reg_class_agnostic=True
    )
    head.init_weights()
    rois = _rois(n)
    cls_score, bbox_pred = head(torch.randn(n, 16, 7, 7))
    labels = torch.randint(0, num_classes + 1, (n,))
    (refined,) = head.refine_bboxes(
        sampling_results=[SamplingResult.random()],
        bbox_results=dict(
            rois=rois,
            cls_score=cls_score,
            bbox_pred=bbox_pred,
            bbox_targets=(labels, None, None, None),
        ),
        batch_img_metas=[dict(img_shape=(128, 128), scale_factor=1)],
    )
    assert isinstance(refined, InstanceData)
    assert len(refined) <= n
    assert refined.bboxes.shape[1:] == (4,)


# -------------------------------------------------- arguments it refuses


@pytest.mark.parametrize(
    'kwargs,message',
    [
        (dict(num_shared_convs=4), 'num_shared_convs=4 is not supported'),
        (dict(num_cls_convs=1), 'num_cls_convs=1 is not supported'),
        (dict(num_reg_fcs=1), 'num_reg_fcs=1 is not supported'),
        (dict(conv_out_channels=256), 'conv_out_channels=256 is not'),
        (
            # A Shared4Conv1FCBBoxHead config's: both named at once.
            dict(conv_out_channels=256, conv_cfg=dict(type='Conv2d')),
            "conv_out_channels=256, conv_cfg={'type': 'Conv2d'} is not",
        ),
        (
            dict(norm_cfg=dict(type='GN', num_groups=32)),
            "norm_cfg={'type': 'GN', 'num_groups': 32} is not",
        ),
        (
            dict(num_shared_fcs=1, num_task_attn=2),
            'num_shared_fcs=1 and num_task_attn=2 disagree',
        ),
        (dict(num_shared_fcs=0), 'num_task_attn must be an integer >= 1'),
        (dict(fc_out_channels=0), 'fc_out_channels must be a positive'),
    ],
)
def test_arguments_it_cannot_honour_are_named(kwargs, message):
    cfg = dict(type='TaskAttnBBoxHead', in_channels=16, num_classes=3)
    with pytest.raises(ValueError, match=message) as err:
        MODELS.build(dict(cfg, **kwargs))
    if 'disagree' not in message and 'must be' not in message:
        names = ' and '.join(kwargs)
        assert f'Remove {names} from model.roi_head.bbox_head' in str(
            err.value
        )


# ------------------------------------- the shipped configs' checkpoints


@pytest.mark.parametrize('family', ['faster', 'mask', 'cascade'])
def test_shipped_fig2c_heads_keep_their_checkpoint_format(family):
    """Two attentions (C -> C/4 -> 4C 1x1 convs) and predictors on the
    flattened 256x7x7 RoI: the parameters the Fig. 2c configs have always
    had, so their checkpoints load unchanged."""
    folder = f'{family}_rcnn'
    cfg = Config.fromfile(
        osp.join(
            REPO_ROOT,
            'configs',
            folder,
            f'{family}-rcnn_r50_fpn_{FIG2C}_1x_coco.py',
        )
    )
    heads = cfg.model.roi_head.bbox_head
    for head_cfg in heads if isinstance(heads, list) else [heads]:
        head = MODELS.build(head_cfg)
        reg = 4 if head_cfg.reg_class_agnostic else 320
        shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        expected = {'fc_cls.weight': (81, 12544), 'fc_cls.bias': (81,)}
        expected.update({'fc_reg.weight': (reg, 12544), 'fc_reg.bias': (reg,)})
        for i in range(2):
            expected.update(
                {
                    f'task_attns.{i}.fc1.weight': (64, 256, 1, 1),
                    f'task_attns.{i}.fc1.bias': (64,),
                    f'task_attns.{i}.fc2.weight': (1024, 64, 1, 1),
                    f'task_attns.{i}.fc2.bias': (1024,),
                }
            )
        assert shapes == expected
