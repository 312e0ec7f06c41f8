"""Mask R-CNN, Cascade R-CNN and RTMDet, each with and without DyHead, as a
user runs them; and TaskAttnBBoxHead (Fig. 2c) inside mmdet's cascade and
mask RoI heads.

Every shipped config of the three families is shrunk
(``projects.synthetic_coco.tiny_detector_cfg``: 32-channel pyramid, 64 px
synthetic images), trained for a few iterations by the package's
``tools/train.py`` and tested by its ``tools/test.py`` (COCO box AP, mask
AP for Mask R-CNN, checked against pycocotools on the dumped results). The
DyHead configs' checkpoints then go through ``tools/export_onnx.py``
(RTMDet: raw maps and ``--postprocess``, verified with onnxruntime;
Cascade R-CNN: ``--postprocess``, verified; Mask R-CNN: refused, naming
what to use instead),
``tools/visualize_attention.py`` and ``tools/image_demo.py``.
"""

import copy
import json
import os
import os.path as osp

import pytest
import torch
from mmdet.models.roi_heads.bbox_heads import BBoxHead
from mmdet.registry import MODELS as MMDET_MODELS
from mmdet.structures import DetDataSample
from mmdet.structures.mask import BitmapMasks
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import HOOKS, init_default_scope
from mmengine.structures import InstanceData
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mmdet_dyhead.models.necks import DyHeadNeck
from mmdet_dyhead.models.roi_heads import TaskAttnBBoxHead
from projects.synthetic_coco import (
    SYNTHETIC_CLASSES,
    generate_synthetic_coco,
    shrink_model,
    tiny_detector_cfg,
)
from tests.helpers import REPO_ROOT

CFG = osp.join(REPO_ROOT, 'configs')
FIG2C = 'dyhead-6b-scale-spatial_task-attn-roi-head'
FAMILIES = {
    'mask_rcnn': [
        'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
        'mask_rcnn/mask-rcnn_r50_fpn_dyhead-6b_1x_coco.py',
        f'mask_rcnn/mask-rcnn_r50_fpn_{FIG2C}_1x_coco.py',
    ],
    'cascade_rcnn': [
        'cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py',
        'cascade_rcnn/cascade-rcnn_r50_fpn_dyhead-6b_1x_coco.py',
        f'cascade_rcnn/cascade-rcnn_r50_fpn_{FIG2C}_1x_coco.py',
    ],
    'rtmdet': [
        'rtmdet/rtmdet_tiny_8xb32-300e_coco.py',
        'rtmdet/rtmdet_tiny_dyhead-2b_8xb32-300e_coco.py',
    ],
}
CONFIGS = [c for family in FAMILIES.values() for c in family]
DYHEAD_CONFIGS = [c for c in CONFIGS if 'dyhead' in c]
IMAGE = 64
ITERS = 4
# RTMDet trains with AdamW (base lr 0.004): the SGD rate of the R-CNNs'
# tiny runs would throw it off in one step.
LR = {'rtmdet': 0.004}

pytestmark = pytest.mark.usefixtures('one_thread')


def _ids(configs):
    return [osp.basename(c)[:-3] for c in configs]


@HOOKS.register_module(force=True)
class FamilyE2ERecorderHook(Hook):
    """Losses of each training iteration and the test metrics, as the
    tools' runners produce them (the hook is named in the test config)."""

    priority = 'LOWEST'
    losses = []
    metrics = {}

    def after_train_iter(
        self, runner, batch_idx, data_batch=None, outputs=None
    ):
        type(self).losses.append(float(outputs['loss']))

    def after_test_epoch(self, runner, metrics=None):
        type(self).metrics = dict(metrics or {})


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return generate_synthetic_coco(
        str(tmp_path_factory.mktemp('synthetic')),
        num_train=2,
        num_val=2,
        image_size=IMAGE,
        seed=0,
        objects_per_image=(2, 3),
        size_range=(0.25, 0.7),
    )


_TRAINED = {}


def _train(config: str, data: dict, root) -> dict:
    """Train ``config`` (tiny) with tools/train.py once per session."""
    from mmdet_dyhead.cli import train as train_tool

    if config in _TRAINED:
        return _TRAINED[config]
    name = osp.basename(config)[:-3]
    work = root / name
    family = config.split('/')[0]
    cfg = tiny_detector_cfg(
        osp.join(CFG, config),
        data,
        str(work),
        iters=ITERS,
        image=IMAGE,
        lr=LR.get(family, 0.05),
        checkpoint_interval=ITERS,
    )
    cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + [
        dict(type='FamilyE2ERecorderHook')
    ]
    cfg.experiment_name = f'families_{name}'
    cfg_file = str(root / f'{name}.py')
    cfg.dump(cfg_file)
    FamilyE2ERecorderHook.losses = []
    train_tool.main([cfg_file])
    _TRAINED[config] = dict(
        cfg=cfg,
        cfg_file=cfg_file,
        ckpt=str(work / f'iter_{ITERS}.pth'),
        work=work,
        losses=list(FamilyE2ERecorderHook.losses),
    )
    return _TRAINED[config]


def _pycocotools_ap(ann_file: str, det_file: str, kind: str) -> float:
    gt = COCO(ann_file)
    with open(det_file) as f:
        dets = json.load(f)
    ev = COCOeval(gt, gt.loadRes(dets), kind)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats[0]


@pytest.mark.slow
@pytest.mark.parametrize('config', CONFIGS, ids=_ids(CONFIGS))
def test_train_and_test_through_the_tools(config, data, tmp_path_factory):
    from mmdet_dyhead.cli import test as test_tool

    run = _train(config, data, tmp_path_factory.mktemp('families'))
    losses = run['losses']
    # Finite, not falling: RTMDet's loss rises over the first iterations
    # (its soft IoU targets grow as its boxes improve); tests/
    # test_detectors_e2e.py checks the fall on the paper's detectors.
    assert len(losses) == ITERS
    assert all(map(torch.isfinite, torch.tensor(losses))), losses
    assert osp.isfile(run['ckpt'])

    FamilyE2ERecorderHook.metrics = {}
    run['cfg'].experiment_name += '_test'
    test_file = run['cfg_file'][:-3] + '_test.py'
    run['cfg'].dump(test_file)
    test_tool.main([test_file, run['ckpt']])
    metrics = FamilyE2ERecorderHook.metrics
    kinds = ['bbox', 'segm'] if config.startswith('mask_rcnn') else ['bbox']
    assert {k for k in metrics if k.endswith('_mAP')} == {
        f'coco/{k}_mAP' for k in kinds
    }
    for kind in kinds:
        # mmdet's CocoMetric agrees with pycocotools on the same results
        # (mmdet rounds to 3 decimals).
        ref = _pycocotools_ap(
            data['val_ann'], str(run['work'] / f'dets.{kind}.json'), kind
        )
        assert metrics[f'coco/{kind}_mAP'] == pytest.approx(
            max(ref, 0.0), abs=6e-4
        )


@pytest.mark.slow
@pytest.mark.parametrize('config', DYHEAD_CONFIGS, ids=_ids(DYHEAD_CONFIGS))
def test_export_attention_plots_and_demo(
    config, data, tmp_path_factory, tmp_path, capsys
):
    pytest.importorskip('onnxruntime')
    pytest.importorskip('matplotlib')
    from mmdet_dyhead.cli import export_onnx, image_demo, visualize_attention

    run = _train(config, data, tmp_path_factory.mktemp('families'))
    val_dir = osp.join(data['data_root'], data['val_img_dir'])
    image = osp.join(val_dir, sorted(os.listdir(val_dir))[0])
    args = [run['cfg_file'], run['ckpt'], '--image', image]

    capsys.readouterr()
    if config.startswith('rtmdet'):
        # Raw maps, then the end-to-end graph; both checked against
        # PyTorch on the image by the tool itself.
        assert (
            export_onnx.main(args + ['--out', str(tmp_path / 'a.onnx')]) == 0
        )
        assert 'OK' in capsys.readouterr().out
        out = str(tmp_path / 'b.onnx')
        assert export_onnx.main(args + ['--out', out, '--postprocess']) == 0
        assert 'OK' in capsys.readouterr().out
    elif config.startswith('cascade'):
        # No raw-map graph; end to end, checked by the tool.
        out = str(tmp_path / 'two_stage.onnx')
        assert export_onnx.main(args + ['--out', out]) == 2
        assert '--postprocess' in capsys.readouterr().err
        assert export_onnx.main(args + ['--out', out, '--postprocess']) == 0
        assert 'OK' in capsys.readouterr().out
    else:  # Mask R-CNN
        for extra in ([], ['--postprocess']):
            out = str(tmp_path / 'two_stage.onnx')
            assert export_onnx.main(args + ['--out', out] + extra) == 2
            err = capsys.readouterr().err
            assert 'two-stage' in err and 'tools/image_demo.py' in err, err
            assert not osp.exists(out)

    vis = tmp_path / 'vis'
    assert (
        visualize_attention.main(
            [run['cfg_file'], run['ckpt'], '--images', image, '--out-dir']
            + [str(vis)]
        )
        == 0
    )
    stem = osp.splitext(osp.basename(image))[0]
    assert (vis / f'features_{stem}.png').is_file()
    summary = json.loads((vis / 'scale_ratios.json').read_text())
    blocks = 2 if config.startswith('rtmdet') else 6
    wanted = [b for b in ('2', '4', '6') if int(b) <= blocks]
    assert sorted(summary['blocks']) == wanted

    result = image_demo.main(
        [image, run['cfg_file'], '--weights', run['ckpt']]
        + ['--out-dir', str(tmp_path / 'demo'), '--pred-score-thr', '0']
    )
    (pred,) = result['predictions']
    assert len(pred['bboxes']) == len(pred['scores']) > 0
    if config.startswith('mask_rcnn'):
        assert len(pred['masks']) == len(pred['bboxes'])
    assert (tmp_path / 'demo' / 'vis' / osp.basename(image)).is_file()


# ------------------------------ TaskAttnBBoxHead in mmdet's RoI heads (2c)


class _FlatBBoxHead(BBoxHead):
    """mmdet's plain BBoxHead (linear classifier and regressor) on the
    flattened RoI: what TaskAttnBBoxHead is with identity attentions."""

    def forward(self, x):
        return super().forward(x.flatten(1))


def _roi_head_cfgs(config: str, channels: int = 16):
    """The shipped config's RoI head, shrunk (synthetic classes), with its
    train and test settings, as the detector passes them."""
    cfg = Config.fromfile(osp.join(CFG, config))
    shrink_model(cfg.model, channels)
    roi = cfg.model.roi_head
    roi.update(train_cfg=cfg.model.train_cfg.rcnn)
    roi.update(test_cfg=cfg.model.test_cfg.rcnn)
    return roi


def _stages(roi_head):
    heads = roi_head.bbox_head
    return list(heads) if isinstance(heads, torch.nn.ModuleList) else [heads]


def _identity_attention(head: TaskAttnBBoxHead) -> None:
    """fc2 = 0 with biases that give a1 = a2 = 1, b1 = b2 = 0:
    max(x, x) = x."""
    c = head.in_channels
    with torch.no_grad():
        for attn in head.task_attns:
            attn.fc2.weight.zero_()
            attn.fc2.bias.zero_()
            attn.fc2.bias[2 * c : 3 * c] = 3.0  # hard sigmoid 1: a2 = 1


def _inputs(with_masks: bool, seed: int = 0):
    """A 64x64 image's P2-P6 features, 40 proposals, 3 ground truths."""
    g = torch.Generator().manual_seed(seed)
    feats = tuple(
        torch.randn(1, 16, 64 // s, 64 // s, generator=g)
        for s in (4, 8, 16, 32, 64)
    )
    xy = torch.rand(40, 2, generator=g) * 40
    wh = torch.rand(40, 2, generator=g) * 24 + 4
    proposals = torch.cat([xy, (xy + wh).clamp(max=64)], 1)
    gt = InstanceData(
        bboxes=torch.tensor(
            [[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 34.0], [8, 40, 28, 60]]
        ),
        labels=torch.tensor([0, 2, 1]),
    )
    if with_masks:
        masks = torch.zeros(3, 64, 64, dtype=torch.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, gt.bboxes.int().tolist()):
            m[y1:y2, x1:x2] = 1
        gt.masks = BitmapMasks(masks.numpy(), 64, 64)
    sample = DetDataSample(
        metainfo=dict(
            img_shape=(64, 64),
            ori_shape=(64, 64),
            pad_shape=(64, 64),
            batch_input_shape=(64, 64),
            scale_factor=(1.0, 1.0),
        )
    )
    sample.gt_instances = gt

    def proposal_list():  # loss() takes the boxes out: a fresh copy
        return [InstanceData(bboxes=proposals.clone(), scores=xy[:, 0])]

    return feats, proposal_list, [sample]


ROI_CONFIGS = [
    f'cascade_rcnn/cascade-rcnn_r50_fpn_{FIG2C}_1x_coco.py',
    f'mask_rcnn/mask-rcnn_r50_fpn_{FIG2C}_1x_coco.py',
]


@pytest.mark.parametrize('config', ROI_CONFIGS, ids=['cascade', 'mask'])
def test_fig2c_roi_head_reduces_to_mmdets_linear_head(config):
    """With identity attentions, every stage of the shipped Fig. 2c RoI head
    is mmdet's linear BBoxHead on the flattened RoI: losses (targets,
    sampling and the cascade's box refinement included) and predictions
    (boxes, and masks for Mask R-CNN) are bit for bit those of the same RoI
    head with mmdet's heads and the same weights."""
    init_default_scope('mmdet')
    roi_cfg = _roi_head_cfgs(config)
    ours = MMDET_MODELS.build(copy.deepcopy(roi_cfg))
    ref = MMDET_MODELS.build(copy.deepcopy(roi_cfg))
    cfgs = roi_cfg.bbox_head
    cfgs = cfgs if isinstance(cfgs, list) else [cfgs]
    assert len(_stages(ours)) == (3 if 'cascade' in config else 1)
    for i, (head, head_cfg) in enumerate(zip(_stages(ours), cfgs)):
        assert isinstance(head, TaskAttnBBoxHead)
        _identity_attention(head)
        kwargs = {
            k: v
            for k, v in head_cfg.items()
            # The settings of TaskAttnBBoxHead's own layers.
            if k not in ('type', 'num_task_attn', 'fc_out_channels')
        }
        flat = _FlatBBoxHead(**kwargs)
        if isinstance(ref.bbox_head, torch.nn.ModuleList):
            ref.bbox_head[i] = flat
        else:
            ref.bbox_head = flat
    result = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not result.missing_keys
    assert all('task_attns' in k for k in result.unexpected_keys)

    masks = 'mask_head' in roi_cfg
    feats, proposals, samples = _inputs(masks)
    torch.manual_seed(1)  # the RoI sampler's draws
    loss_ours = ours.loss(feats, proposals(), samples)
    torch.manual_seed(1)
    loss_ref = ref.loss(feats, proposals(), samples)
    assert sorted(loss_ours) == sorted(loss_ref)
    if masks:
        assert 'loss_mask' in loss_ours
    for key in loss_ref:
        torch.testing.assert_close(
            loss_ours[key], loss_ref[key], rtol=0, atol=0
        )

    with torch.no_grad():
        (pred,) = ours.predict(feats, proposals(), samples)
        (pred_ref,) = ref.predict(feats, proposals(), samples)
    assert len(pred.bboxes) > 0
    for key in ('bboxes', 'scores', 'labels') + (('masks',) if masks else ()):
        torch.testing.assert_close(pred[key], pred_ref[key], rtol=0, atol=0)

    # Not vacuous: one channel's a1 = 2 in the last stage changes the loss.
    with torch.no_grad():
        _stages(ours)[-1].task_attns[0].fc2.bias[0] = 3.0
    torch.manual_seed(1)
    changed = ours.loss(feats, proposals(), samples)
    assert any(
        not torch.equal(torch.as_tensor(changed[k]), torch.as_tensor(v))
        for k, v in loss_ref.items()
    )


@pytest.mark.parametrize('config', ROI_CONFIGS, ids=['cascade', 'mask'])
def test_fig2c_roi_head_trains_every_stages_attention(config):
    """Shapes and gradients through the shipped Fig. 2c RoI head: each
    cascade stage keeps mmdet's class-agnostic regression and its own
    target stds, and the losses reach every stage's task attentions, the
    predictors and the pyramid level the RoIs were pooled from."""
    init_default_scope('mmdet')
    roi_cfg = _roi_head_cfgs(config)
    head = MMDET_MODELS.build(roi_cfg)
    cascade = 'cascade' in config
    stds = [list(s.bbox_coder.stds) for s in _stages(head)]
    if cascade:
        assert stds == [
            [0.1, 0.1, 0.2, 0.2],
            [0.05, 0.05, 0.1, 0.1],
            [0.033, 0.033, 0.067, 0.067],
        ]
    for stage in _stages(head):
        assert stage.reg_class_agnostic == cascade
        with torch.no_grad():  # away from the near-ReLU init
            for attn in stage.task_attns:
                for p in attn.parameters():
                    p.normal_(0, 0.3)
    feats, proposals, samples = _inputs('mask_head' in roi_cfg, seed=1)
    feats = tuple(f.requires_grad_() for f in feats)
    stage0 = _stages(head)[0]
    rois = torch.randn(5, 16, 7, 7)
    cls_score, bbox_pred = stage0(rois)
    c = len(SYNTHETIC_CLASSES)
    assert cls_score.shape == (5, c + 1)
    assert bbox_pred.shape == ((5, 4) if cascade else (5, 4 * c))

    losses = head.loss(feats, proposals(), samples)
    total = sum(
        v.sum() if torch.is_tensor(v) else sum(v)
        for k, v in losses.items()
        if 'loss' in k
    )
    assert torch.isfinite(total)
    total.backward()
    for i, stage in enumerate(_stages(head)):
        for name, p in stage.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (i, name)
    # mmdet maps RoIs under 112 px (all of these) to P2.
    assert feats[0].grad.abs().sum() > 0


@pytest.mark.parametrize('config', DYHEAD_CONFIGS, ids=_ids(DYHEAD_CONFIGS))
def test_shipped_dyhead_configs_build_with_their_dyheadneck(config):
    """What each config puts where (full size, no weights)."""
    init_default_scope('mmdet')
    cfg = Config.fromfile(osp.join(CFG, config))
    cfg.model.backbone.init_cfg = None
    model = MMDET_MODELS.build(cfg.model)
    (neck,) = [m for m in model.modules() if isinstance(m, DyHeadNeck)]
    block = neck.dyhead_blocks[0]
    fig2c = FIG2C in config
    assert (block.task_attn is None) == fig2c
    task_heads = [
        m for m in model.modules() if isinstance(m, TaskAttnBBoxHead)
    ]
    if config.startswith('rtmdet'):
        assert (neck.num_blocks, neck.num_levels) == (2, 3)
        assert neck.in_channels == neck.out_channels == 96
        assert model.bbox_head.stacked_convs == 0
    else:
        assert neck.num_blocks == 6
        assert len(task_heads) == (
            (3 if 'cascade' in config else 1) if fig2c else 0
        )
    if config.startswith('mask_rcnn'):
        # The mask head stays mmdet's (see the config's header).
        assert type(model.roi_head.mask_head).__name__ == 'FCNMaskHead'


def test_rtmdet_dyhead_keeps_rtmdets_hooks_and_recipe():
    """The DyHead config lists custom_hooks anew (a list replaces the
    base's): RTMDet's EMA and pipeline switch must be exactly the base's,
    the wiring check added after them."""

    def unscoped(obj):
        # mmengine tags dicts read from mmdet's files with _scope_='mmdet';
        # the config's scope is mmdet either way.
        if isinstance(obj, dict):
            return {k: unscoped(v) for k, v in obj.items() if k != '_scope_'}
        if isinstance(obj, (list, tuple)):
            return [unscoped(v) for v in obj]
        return obj

    base = Config.fromfile(osp.join(CFG, FAMILIES['rtmdet'][0]))
    ours = Config.fromfile(osp.join(CFG, FAMILIES['rtmdet'][1]))
    assert ours.default_scope == 'mmdet'
    assert unscoped(ours.custom_hooks[:-1]) == unscoped(base.custom_hooks)
    assert ours.custom_hooks[-1] == dict(type='DyHeadCheckHook')
    for key in ('optim_wrapper', 'param_scheduler', 'train_cfg'):
        assert ours[key] == base[key], key
    assert unscoped(ours.model.neck[0]) == unscoped(base.model.neck)
