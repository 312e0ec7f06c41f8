"""Every shipped config loads and builds; the paper's rows differ from their
baselines only where the paper says; miswired DyHead detectors are stopped
by DyHeadCheckHook before they run, with a message naming the setting to
change."""

import ast
import copy
import functools
import glob
import os.path as osp
import re

import mmdet
import pytest
from mmengine.config import Config
from mmengine.registry import MODELS as ROOT_MODELS
from mmengine.registry import init_default_scope
from mmengine.runner import Runner
from torch.nn import ModuleList

from mmdet_dyhead.engine import DyHeadConfigError, check_dyhead_detector
from mmdet_dyhead.models.necks import DyHeadNeck
from mmdet_dyhead.models.roi_heads import TaskAttnBBoxHead
from mmdet_dyhead.registry import MODELS
from tests.helpers import REPO_ROOT

# Building fills large weight tensors; on a loaded 2-core machine a second
# intra-op thread mostly waits.
pytestmark = pytest.mark.usefixtures('one_thread')
CONFIG_ROOT = osp.join(REPO_ROOT, 'configs')
DOCS = osp.join(REPO_ROOT, 'docs', 'configs.md')
# The quickstart's configs are tested with the quickstart.
SHIPPED = sorted(
    osp.relpath(p, CONFIG_ROOT)
    for p in glob.glob(osp.join(CONFIG_ROOT, '**', '*.py'), recursive=True)
    if not osp.relpath(p, CONFIG_ROOT).startswith(('quickstart', '_base_'))
)
ATTN_TOKENS = ('scale', 'spatial', 'task')


@pytest.fixture(autouse=True)
def _mmdet_scope():
    init_default_scope('mmdet')


@functools.lru_cache(maxsize=None)
def _load_cached(rel_path: str) -> Config:
    return Config.fromfile(osp.join(CONFIG_ROOT, rel_path))


def _load(rel_path: str) -> Config:
    # Parsing resolves mmdet:: bases from disk; many tests read the same
    # files, and each gets its own copy to modify.
    return copy.deepcopy(_load_cached(rel_path))


def _build(model_cfg, registry=ROOT_MODELS):
    # Runner builds with mmengine's root registry; mmdet's APIs with mmdet's.
    model_cfg = model_cfg.copy()
    model_cfg.backbone = dict(model_cfg.backbone, init_cfg=None)
    return registry.build(model_cfg)


def _dyhead_token(rel_path: str):
    """'dyhead-6b-scale-spatial' -> (6, {'scale', 'spatial'}, tokens)."""
    for part in osp.basename(rel_path)[:-3].split('_'):
        m = re.fullmatch(r'dyhead-(\d+)b((?:-[a-z]+)*)', part)
        if m:
            tokens = set(m.group(2).split('-')) - {''}
            return int(m.group(1)), tokens
    return None


def test_every_family_and_table_has_configs():
    assert len(SHIPPED) >= 30
    for folder in (
        'atss',
        'fcos',
        'retinanet',
        'reppoints',
        'faster_rcnn',
        'mask_rcnn',
        'cascade_rcnn',
        'rtmdet',
    ):
        assert any(p.startswith(folder + '/') for p in SHIPPED), folder


@pytest.mark.parametrize('rel_path', SHIPPED)
def test_config_name_follows_mmdet_convention(rel_path):
    folder, name = osp.split(rel_path)
    parts = name[:-3].split('_')
    assert all(re.fullmatch(r'[a-z0-9.-]+', p) for p in parts), name
    assert parts[0].startswith(folder.replace('_', '-')), name
    assert parts[-1] == 'coco', name
    if folder == 'rtmdet':
        # mmdet's RTMDet names: size, then GPUs x batch and epochs.
        assert parts[1] in ('tiny', 's', 'm', 'l', 'x'), name
        assert re.fullmatch(r'\d+xb\d+-\d+e', parts[-2]), name
        return
    assert parts[2].startswith('fpn'), name
    assert re.fullmatch(r'(ms-)?\d+x', parts[-2]), name


@pytest.mark.parametrize('rel_path', SHIPPED)
def test_config_loads_and_builds(rel_path):
    cfg = _load(rel_path)
    assert 'mmdet_dyhead' in cfg.custom_imports.imports
    assert cfg.custom_imports.allow_failed_imports is False
    assert cfg.default_scope == 'mmdet'
    model = _build(cfg.model)
    assert type(model).__name__ == cfg.model.type

    dyheads = [m for m in model.modules() if isinstance(m, DyHeadNeck)]
    token = _dyhead_token(rel_path)
    if token is None:
        assert not dyheads
        return
    num_blocks, tokens = token
    assert len(dyheads) == 1 and dyheads[0].num_blocks == num_blocks
    # A name listing attentions means exactly those are on.
    wanted = tokens & set(ATTN_TOKENS) or set(ATTN_TOKENS)
    for block in dyheads[0].dyhead_blocks:
        on = {
            'scale': block.scale_attn is not None,
            'spatial': block.spatial_attn.deformable,
            'task': block.task_attn is not None,
        }
        assert {k for k, v in on.items() if v} == wanted
    hooks = [
        h
        for h in cfg.get('custom_hooks', [])
        if h['type'] == 'DyHeadCheckHook'
    ]
    assert len(hooks) == 1, 'a DyHead config enables DyHeadCheckHook'
    towers_allowed = hooks[0].get('allow_head_towers', False)
    check_dyhead_detector(model, towers_allowed)
    head = getattr(model, 'bbox_head', None)
    if head is not None:
        assert (head.stacked_convs > 0) == towers_allowed
    roi_head = getattr(model, 'roi_head', None)
    if roi_head is not None:
        # Fig. 2c: task-aware attention moves from the pyramid to the RoI
        # (every stage of a cascade).
        stages = roi_head.bbox_head
        stages = stages if isinstance(stages, ModuleList) else [stages]
        for stage in stages:
            assert isinstance(stage, TaskAttnBBoxHead) == (
                'task' not in wanted
            )


def _flatten(obj, prefix=''):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f'{prefix}{k}.'))
        return out or {prefix[:-1]: {}}
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f'{prefix}{i}.'))
        return out or {prefix[:-1]: type(obj)()}
    return {prefix[:-1]: obj}


def _differences(a: str, b: str):
    fa, fb = _flatten(_load(a).to_dict()), _flatten(_load(b).to_dict())
    return {
        k
        for k in set(fa) | set(fb)
        if fa.get(k, '<unset>') != fb.get(k, '<unset>')
    }


DYHEAD_HEAD = (
    'model.neck',
    'model.bbox_head.stacked_convs',
    'model.bbox_head.feat_channels',
    'custom_hooks',
)
# The two-stage DyHead configs take the DyHead block from
# configs/_base_/dyhead-6b_neck.py, which also leaves it in the resolved
# config as the variable ``dyhead_neck`` (see that file).
TWO_STAGE_NECK = ('model.neck', 'custom_hooks', 'dyhead_neck')
TWO_STAGE_FIG2C = TWO_STAGE_NECK + ('model.roi_head.bbox_head',)
# (reference config, config, setting prefixes allowed to differ)
COMPARISONS = [
    # Table 3: each +DyHead row differs from its baseline only in the neck
    # and the head's towers (two-stage: the RoI box head).
    (
        'atss/atss_r50_fpn_1x_coco.py',
        'atss/atss_r50_fpn_dyhead-6b_1x_coco.py',
        DYHEAD_HEAD,
    ),
    (
        'fcos/fcos_r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_'
        '1x_coco.py',
        'fcos/fcos_r50-caffe_fpn_dyhead-6b-center-normbbox-centeronreg-giou_'
        '1x_coco.py',
        DYHEAD_HEAD,
    ),
    (
        'retinanet/retinanet_r50_fpn_1x_coco.py',
        'retinanet/retinanet_r50_fpn_dyhead-6b_1x_coco.py',
        DYHEAD_HEAD,
    ),
    (
        'retinanet/retinanet_r50_fpn_1x_coco.py',
        'retinanet/retinanet_r50_fpn_dyhead-6b-towers_1x_coco.py',
        ('model.neck', 'custom_hooks'),
    ),
    (
        'reppoints/reppoints-moment_r50_fpn-gn_head-gn_1x_coco.py',
        'reppoints/reppoints-moment_r50_fpn-gn_dyhead-6b_1x_coco.py',
        DYHEAD_HEAD,
    ),
    (
        'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
        'faster_rcnn/faster-rcnn_r50_fpn_dyhead-6b-scale-spatial_'
        'task-attn-roi-head_1x_coco.py',
        TWO_STAGE_FIG2C,
    ),
    (
        'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
        'faster_rcnn/faster-rcnn_r50_fpn_dyhead-6b_1x_coco.py',
        TWO_STAGE_NECK,
    ),
    # Beyond the paper: Mask R-CNN and Cascade R-CNN in both forms (the
    # Fig. 2c form changes the box head of every stage, never the mask
    # head), RTMDet with DyHead in place of its head towers.
    (
        'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
        'mask_rcnn/mask-rcnn_r50_fpn_dyhead-6b-scale-spatial_'
        'task-attn-roi-head_1x_coco.py',
        TWO_STAGE_FIG2C,
    ),
    (
        'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
        'mask_rcnn/mask-rcnn_r50_fpn_dyhead-6b_1x_coco.py',
        TWO_STAGE_NECK,
    ),
    (
        'cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py',
        'cascade_rcnn/cascade-rcnn_r50_fpn_dyhead-6b-scale-spatial_'
        'task-attn-roi-head_1x_coco.py',
        TWO_STAGE_FIG2C,
    ),
    (
        'cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py',
        'cascade_rcnn/cascade-rcnn_r50_fpn_dyhead-6b_1x_coco.py',
        TWO_STAGE_NECK,
    ),
    (
        'rtmdet/rtmdet_tiny_8xb32-300e_coco.py',
        'rtmdet/rtmdet_tiny_dyhead-2b_8xb32-300e_coco.py',
        DYHEAD_HEAD,
    ),
    # Table 4: backbone and schedule only.
    (
        'atss/atss_r50_fpn_dyhead-6b_1x_coco.py',
        'atss/atss_r50_fpn_dyhead-6b_2x_coco.py',
        ('train_cfg.max_epochs', 'param_scheduler', 'max_epochs'),
    ),
    (
        'atss/atss_r50_fpn_dyhead-6b_2x_coco.py',
        'atss/atss_r101_fpn_dyhead-6b_2x_coco.py',
        ('model.backbone',),
    ),
    (
        'atss/atss_r50_fpn_dyhead-6b_1x_coco.py',
        'atss/atss_x101-64x4d_fpn_dyhead-6b_1x_coco.py',
        ('model.backbone',),
    ),
    # Table 5: DCN, then multi-scale training and the TTA settings.
    (
        'atss/atss_x101-64x4d_fpn_dyhead-6b_2x_coco.py',
        'atss/atss_x101-64x4d-mdconv-c3-c5_fpn_dyhead-6b_2x_coco.py',
        ('model.backbone.dcn', 'model.backbone.stage_with_dcn'),
    ),
    (
        'atss/atss_x101-64x4d-mdconv-c3-c5_fpn_dyhead-6b_2x_coco.py',
        'atss/atss_x101-64x4d-mdconv-c3-c5_fpn_dyhead-6b_ms-2x_coco.py',
        ('train_dataloader.dataset.pipeline', 'train_pipeline', 'tta_'),
    ),
]
# Tables 1 and 2: one DyHeadNeck argument each.
COMPARISONS += [
    (
        'atss/atss_r50_fpn_dyhead-6b_1x_coco.py',
        p,
        ('model.neck.1.num_blocks', 'model.neck.1.use_'),
    )
    for p in SHIPPED
    if re.search(r'atss_r50_fpn_dyhead-((?!6b_)\d+b|6b-[a-z-]+)_1x', p)
]
# Fig. 2c against its DyHead-neck sibling, which it inherits: the pyramid
# loses task-aware attention and every box head (each cascade stage)
# becomes TaskAttnBBoxHead; the heads' other settings are the sibling's.
FIG2C = 'dyhead-6b-scale-spatial_task-attn-roi-head'
TWO_STAGE = (
    'faster_rcnn/faster-rcnn',
    'mask_rcnn/mask-rcnn',
    'cascade_rcnn/cascade-rcnn',
)
COMPARISONS += [
    (
        f'{family}_r50_fpn_dyhead-6b_1x_coco.py',
        f'{family}_r50_fpn_{FIG2C}_1x_coco.py',
        ('model.neck.1.use_task_attn', 'dyhead_neck.use_task_attn')
        + tuple(
            f'model.roi_head.bbox_head.{stage}{key}'
            for stage in (
                ('0.', '1.', '2.') if family.startswith('cascade') else ('',)
            )
            for key in ('type', 'num_task_attn', 'fc_out_channels')
        ),
    )
    for family in TWO_STAGE
]


@pytest.mark.parametrize(
    'ref,cfg,allowed',
    COMPARISONS,
    ids=[osp.basename(c[1])[:-3] for c in COMPARISONS],
)
def test_config_differs_from_its_reference_only_where_intended(
    ref, cfg, allowed
):
    diff = _differences(ref, cfg)
    assert diff, 'the two configs are identical'
    unexpected = {k for k in diff if not k.startswith(allowed)}
    assert not unexpected, sorted(unexpected)


def _bases(rel_path: str):
    """The ``_base_`` entries of a config file, relative to configs/
    (``mmdet::`` entries as written)."""
    with open(osp.join(CONFIG_ROOT, rel_path)) as f:
        tree = ast.parse(f.read())
    (value,) = [
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and getattr(node.targets[0], 'id', None) == '_base_'
    ]
    bases = ast.literal_eval(value)
    bases = [bases] if isinstance(bases, str) else bases
    return [
        b if '::' in b else osp.normpath(osp.join(osp.dirname(rel_path), b))
        for b in bases
    ]


@pytest.mark.parametrize('family', TWO_STAGE)
def test_two_stage_configs_inherit_their_siblings(family):
    """Fig. 2c <- DyHead neck <- (baseline, shared DyHead block) <- mmdet."""
    baseline = f'{family}_r50_fpn_1x_coco.py'
    neck = f'{family}_r50_fpn_dyhead-6b_1x_coco.py'
    assert _bases(f'{family}_r50_fpn_{FIG2C}_1x_coco.py') == [neck]
    assert _bases(neck) == [baseline, '_base_/dyhead-6b_neck.py']
    assert _bases(baseline) == [f'mmdet::{baseline}']


@pytest.mark.parametrize('family', TWO_STAGE)
def test_two_stage_baselines_are_mmdets_configs(family):
    """The root of each chain: mmdet's config plus the package import (the
    ``_scope_`` that mmengine stamps on dicts read through ``mmdet::``
    aside)."""
    rel_path = f'{family}_r50_fpn_1x_coco.py'
    ours = _flatten(_load(rel_path).to_dict())
    mmdet_configs = osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs')
    theirs = _flatten(
        Config.fromfile(osp.join(mmdet_configs, rel_path)).to_dict()
    )
    diff = {
        k
        for k in set(ours) | set(theirs)
        if ours.get(k, '<unset>') != theirs.get(k, '<unset>')
        and not k.endswith('._scope_')
    }
    assert diff == {
        'custom_imports.imports.0',
        'custom_imports.allow_failed_imports',
    }


@pytest.mark.parametrize('form', ['dyhead-6b', FIG2C])
def test_two_stage_families_share_the_faster_rcnn_neck(form):
    """Mask and Cascade R-CNN get the Faster R-CNN DyHead neck by
    inheritance: the same dicts, the FPN being each baseline's (mmdet's
    R-50 FPN, the same in the three families)."""
    necks = [
        _load(f'{family}_r50_fpn_{form}_1x_coco.py').to_dict()['model']['neck']
        for family in TWO_STAGE
    ]
    assert necks[1] == necks[0] and necks[2] == necks[0]
    fpn, dyhead = necks[0]
    for family in TWO_STAGE:
        base = _load(f'{family}_r50_fpn_1x_coco.py').to_dict()
        assert base['model']['neck'] == fpn
    assert dyhead['type'] == 'DyHeadNeck'
    assert (dyhead['num_blocks'], dyhead['num_levels']) == (6, fpn['num_outs'])
    assert dyhead.get('use_task_attn', True) == (form == 'dyhead-6b')


def test_tta_pipeline_gives_every_scale_with_and_without_flip(tmp_path):
    import cv2
    import numpy as np
    from mmcv.transforms import Compose

    cfg = _load(
        'atss/atss_x101-64x4d-mdconv-c3-c5_fpn_dyhead-6b_ms-2x_coco.py'
    )
    img = osp.join(str(tmp_path), 'img.png')
    cv2.imwrite(img, np.zeros((48, 64, 3), np.uint8))
    out = Compose(cfg.tta_pipeline)(
        dict(
            img_path=img,
            img_id=0,
            instances=[dict(bbox=[1, 2, 30, 40], bbox_label=0, ignore_flag=0)],
        )
    )
    metas = [s.metainfo for s in out['data_samples']]
    assert len(metas) == 2 * len(cfg.tta_scales)
    for scale in cfg.tta_scales:
        # A 48x64 image reaches the short side of every scale before the
        # long side limit.
        got = [m for m in metas if min(m['img_shape']) == min(scale)]
        assert sorted(m['flip'] for m in got) == [False, True], scale
    # The wrapper mmdet's test.py --tta builds around the detector.
    tta = MODELS.build(
        dict(
            cfg.tta_model,
            module=dict(
                cfg.model, backbone=dict(cfg.model.backbone, init_cfg=None)
            ),
        )
    )
    assert type(tta).__name__ == 'DetTTAModel'


def test_docs_table_lists_every_config_and_only_existing_ones():
    with open(DOCS) as f:
        text = f.read()
    listed = set(re.findall(r'`configs/([\w./-]+\.py)`', text))
    missing = sorted(p for p in SHIPPED if p not in listed)
    assert not missing, f'configs not in docs/configs.md: {missing}'
    stale = sorted(
        p for p in listed if not osp.exists(osp.join(CONFIG_ROOT, p))
    )
    assert not stale, f'docs/configs.md names missing files: {stale}'


# ---------------------------------------------------------------- bad input

DY_ATSS = 'atss/atss_r50_fpn_dyhead-6b_1x_coco.py'


def test_head_with_conv_towers_is_stopped_before_training(tmp_path):
    """Through mmengine's Runner, as tools/train.py runs it: the hook of the
    shipped config stops the run before the first iteration."""
    from projects.synthetic_coco import (
        generate_synthetic_coco,
        tiny_detector_cfg,
    )

    data = generate_synthetic_coco(
        str(tmp_path / 'data'),
        num_train=2,
        num_val=1,
        image_size=64,
        objects_per_image=(2, 3),
    )
    cfg = tiny_detector_cfg(
        osp.join(CONFIG_ROOT, DY_ATSS), data, str(tmp_path / 'work'), iters=1
    )
    cfg.model.bbox_head.stacked_convs = 4
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.experiment_name = 'towers'
    runner = Runner.from_cfg(copy.deepcopy(cfg))
    with pytest.raises(DyHeadConfigError) as err:
        runner.train()
    assert runner.iter == 0
    assert 'model.bbox_head.stacked_convs=4' in str(err.value)
    assert 'stacked_convs=0' in str(err.value)
    assert "dict(type='DyHeadCheckHook', allow_head_towers=True)" in str(
        err.value
    )
    # The documented opt-out.
    cfg.custom_hooks = [dict(type='DyHeadCheckHook', allow_head_towers=True)]
    cfg.experiment_name = 'towers_allowed'
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 1


@pytest.mark.parametrize(
    'change,message',
    [
        (
            lambda m: m.neck[1].update(in_channels=128),
            'model.neck[1].in_channels=256',
        ),
        (
            lambda m: m.neck[1].update(num_levels=4),
            'model.neck[1].num_levels=5',
        ),
        (
            lambda m: m.bbox_head.update(in_channels=128),
            'model.bbox_head.in_channels=256',
        ),
        (
            lambda m: m.bbox_head.update(feat_channels=128),
            'model.bbox_head.feat_channels=256',
        ),
        (
            lambda m: m.bbox_head.anchor_generator.update(
                strides=[8, 16, 32, 64]
            ),
            'predicts on 4 levels',
        ),
    ],
    ids=[
        'fpn-vs-dyhead-channels',
        'levels',
        'head-channels',
        'feat-channels',
        'head-strides',
    ],
)
def test_mismatched_dyhead_detector_names_the_setting(change, message):
    cfg = _load(DY_ATSS)
    change(cfg.model)
    with pytest.raises(DyHeadConfigError, match=re.escape(message)):
        check_dyhead_detector(_build(cfg.model))


def test_two_stage_roi_channels_are_checked():
    cfg = _load(
        'faster_rcnn/faster-rcnn_r50_fpn_dyhead-6b-scale-spatial_'
        'task-attn-roi-head_1x_coco.py'
    )
    cfg.model.roi_head.bbox_roi_extractor.out_channels = 128
    with pytest.raises(
        DyHeadConfigError,
        match=re.escape('bbox_roi_extractor.out_channels=128'),
    ):
        check_dyhead_detector(_build(cfg.model))


CASCADE_FIG2C = f'cascade_rcnn/cascade-rcnn_r50_fpn_{FIG2C}_1x_coco.py'


@pytest.mark.parametrize(
    'change,message',
    [
        (
            lambda roi: roi.bbox_head[2].update(in_channels=128),
            'model.roi_head.bbox_head[2].in_channels=128 but the RoI '
            'extractor gives 256 channels; set model.roi_head.bbox_head[2].'
            'in_channels=256',
        ),
        (
            lambda roi: roi.update(
                bbox_roi_extractor=[
                    dict(roi.bbox_roi_extractor, out_channels=c)
                    for c in (256, 128, 256)
                ]
            ),
            'model.roi_head.bbox_roi_extractor[1].out_channels=128 but '
            'DyHeadNeck out_channels=256',
        ),
    ],
    ids=['stage-head-channels', 'stage-extractor-channels'],
)
def test_cascade_stages_are_checked_one_by_one(change, message):
    cfg = _load(CASCADE_FIG2C)
    change(cfg.model.roi_head)
    with pytest.raises(DyHeadConfigError, match=re.escape(message)):
        check_dyhead_detector(_build(cfg.model))


def test_mask_roi_extractor_is_checked():
    cfg = _load(f'mask_rcnn/mask-rcnn_r50_fpn_{FIG2C}_1x_coco.py')
    cfg.model.roi_head.mask_roi_extractor.out_channels = 128
    with pytest.raises(
        DyHeadConfigError,
        match=re.escape('model.roi_head.mask_roi_extractor.out_channels=128'),
    ):
        check_dyhead_detector(_build(cfg.model))


def test_cascade_stage_mismatch_stops_training(tmp_path):
    """Through mmengine's Runner, as tools/train.py runs the shipped cascade
    config: a third stage that reads other channels than the pyramid gives
    is stopped before the first iteration, and the corrected config
    trains."""
    from projects.synthetic_coco import (
        generate_synthetic_coco,
        tiny_detector_cfg,
    )

    data = generate_synthetic_coco(
        str(tmp_path / 'data'),
        num_train=2,
        num_val=1,
        image_size=64,
        objects_per_image=(2, 3),
    )
    cfg = tiny_detector_cfg(
        osp.join(CONFIG_ROOT, CASCADE_FIG2C),
        data,
        str(tmp_path / 'work'),
        iters=1,
    )
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    channels = cfg.model.roi_head.bbox_head[2].in_channels
    cfg.model.roi_head.bbox_head[2].in_channels = 2 * channels
    cfg.experiment_name = 'mismatch'
    runner = Runner.from_cfg(copy.deepcopy(cfg))
    with pytest.raises(DyHeadConfigError) as err:
        runner.train()
    assert runner.iter == 0
    assert f'model.roi_head.bbox_head[2].in_channels={2 * channels}' in str(
        err.value
    )
    assert 'bbox_head[0]' not in str(err.value)
    cfg.model.roi_head.bbox_head[2].in_channels = channels
    cfg.experiment_name = 'fixed'
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 1


def test_models_without_dyheadneck_are_not_checked():
    # mmdet's own detectors, towers and all, pass; so does mmdet's DyHead
    # recipe (its neck is mmdet's DyHead, not ours).
    mmdet_configs = osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs')
    for path in (
        'atss/atss_r50_fpn_1x_coco.py',
        'dyhead/atss_r50_fpn_dyhead_1x_coco.py',
    ):
        cfg = Config.fromfile(osp.join(mmdet_configs, path))
        cfg.model.bbox_head.stacked_convs = 2
        model = _build(cfg.model, MODELS)
        check_dyhead_detector(model)
        assert model.bbox_head.stacked_convs == 2
