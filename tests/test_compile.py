"""torch.compile of DyHeadNeck: no graph breaks, and the compiled neck
computes what the eager one and mmdet's ``DyHead`` compute.

Inductor compiles C++ for every kernel, minutes on a 2-core machine for a
full neck, so only one test uses it, on a tiny neck; the graph-break checks
trace with Dynamo's ``eager`` backend (the same graph capture, no codegen),
and the Runner test compiles ``train_step`` with ``aot_eager`` (capture plus
AOTAutograd's forward/backward split, no codegen).
"""

import pytest
import torch

from mmdet_dyhead.models import DyHeadNeck
from mmdet_dyhead.ops import mmcv_ops_available
from tests.helpers import pyramid, rel_err

needs_mmcv_ops = pytest.mark.skipif(
    not mmcv_ops_available(), reason='needs mmcv built with its ops'
)


def _randomise(neck):
    """Non-trivial weights: offsets of a few pixels, norms and attention
    logits away from their initial values."""
    with torch.no_grad():
        for name, p in neck.named_parameters():
            if 'offset' in name:
                p.normal_(0, 0.05)
            elif 'norm' in name:
                p.copy_(
                    torch.randn_like(p) * 0.2
                    + (1.0 if name.endswith('weight') else 0.0)
                )
            elif 'attn' in name:
                p.normal_(0, 0.3)
    return neck


def _grad_err(a, b, grads):
    """|a - b| over max |b|, but never over less than 1e-3 of the largest
    gradient of the model: gradients that are zero in exact arithmetic
    (a conv bias before GroupNorm) hold only rounding noise."""
    floor = 1e-3 * max(float(g.abs().max()) for g in grads.values())
    return float((a - b).abs().max()) / max(float(b.abs().max()), floor)


def _fwd_bwd(fn, params, feats):
    feats = [f.detach().clone().requires_grad_() for f in feats]
    for p in params.values():
        p.grad = None
    outs = fn(feats)
    sum((o * o).sum() for o in outs).backward()
    return (
        [o.detach() for o in outs],
        [f.grad for f in feats],
        {n: p.grad.clone() for n, p in params.items()},
    )


@pytest.mark.parametrize(
    'kwargs',
    [
        dict(preset='mmdet'),
        dict(preset='official'),
        dict(preset='paper'),
        dict(preset='aligned'),
        dict(use_scale_attn=False),
        dict(use_spatial_attn=False),
        dict(use_task_attn=False),
        dict(dcn_backend='auto'),
    ],
    ids=lambda k: '-'.join(f'{a}={b}' for a, b in k.items()),
)
def test_neck_compiles_as_one_graph(kwargs):
    """``fullgraph=True`` raises on any graph break; the captured graph
    computes the eager neck's outputs and gradients."""
    torch._dynamo.reset()
    kwargs.setdefault('dcn_backend', 'torch')
    neck = _randomise(DyHeadNeck(16, 16, num_blocks=2, **kwargs))
    params = dict(neck.named_parameters())
    feats = pyramid(2, 16, (12, 10), levels=4)
    compiled = torch.compile(neck, fullgraph=True, backend='eager')
    got = _fwd_bwd(compiled, params, feats)
    want = _fwd_bwd(neck, params, feats)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert rel_err(a, b) < 1e-5
    for name in params:
        assert _grad_err(got[2][name], want[2][name], want[2]) < 1e-3, name


PRESETS = [
    dict(preset='mmdet'),
    dict(preset='official'),
    dict(preset='paper'),
    dict(preset='aligned'),
    dict(use_scale_attn=False),
    dict(use_task_attn=False),
]


@pytest.mark.parametrize(
    'kwargs', PRESETS, ids=lambda k: '-'.join(f'{a}={b}' for a, b in k.items())
)
def test_compiled_neck_from_zero_offsets_equals_eager(kwargs):
    """mmdet's initialisation puts the offset convs at zero: every tap of
    every block sits exactly on a pixel, where bilinear sampling has only
    one-sided derivatives. The compiled neck (AOTAutograd's forward and
    backward graphs) runs the same DCN operator, so every gradient agrees
    with eager to float32 rounding, the offset convs' included."""
    torch._dynamo.reset()
    neck = _randomise(
        DyHeadNeck(16, 16, num_blocks=2, dcn_backend='torch', **kwargs)
    )
    with torch.no_grad():
        for name, p in neck.named_parameters():
            if 'offset' in name:
                p.zero_()
    params = dict(neck.named_parameters())
    feats = pyramid(2, 16, (16, 16), levels=5)
    assert tuple(feats[-1].shape[-2:]) == (1, 1)
    compiled = torch.compile(neck, fullgraph=True, backend='aot_eager')
    got = _fwd_bwd(compiled, params, feats)
    want = _fwd_bwd(neck, params, feats)
    # AOTAutograd's decompositions round differently, and GroupNorm of the
    # 1x1 level (one value per group) amplifies that: 1e-4 for outputs.
    for a, b in zip(got[0], want[0]):
        assert rel_err(a, b) < 1e-4
    # Against the largest input gradient: the 1x1 level's is zero in exact
    # arithmetic (GroupNorm of one value per group), only rounding noise.
    scale = max(float(g.abs().max()) for g in want[1])
    for a, b in zip(got[1], want[1]):
        assert float((a - b).abs().max()) < 1e-5 * scale
    for name in params:
        if name.endswith('branch.conv.bias'):
            continue  # before GroupNorm: zero but for rounding noise
        assert _grad_err(got[2][name], want[2][name], want[2]) < 1e-3, name
    # The offset convs, where the grid_sample form differed by 9-29 %.
    offset_grads = [n for n in params if 'offset' in n]
    assert offset_grads
    for name in offset_grads:
        assert rel_err(got[2][name], want[2][name]) < 1e-4, name


@needs_mmcv_ops
def test_mmcv_backend_runs_compiled_around_its_kernel():
    """An explicit ``dcn_backend='mmcv'`` keeps mmcv's kernel, which
    torch.compile runs eagerly between graphs (no fullgraph)."""
    torch._dynamo.reset()
    neck = _randomise(DyHeadNeck(16, 16, num_blocks=1, dcn_backend='mmcv'))
    feats = pyramid(2, 16, (12, 10), levels=3)
    with torch.no_grad():
        want = neck(feats)
        got = torch.compile(neck, backend='eager')(feats)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


@needs_mmcv_ops
def test_inductor_compiled_neck_equals_eager_and_mmdet_dyhead():
    """``DyHeadNeck(compile=True)`` (inductor, C++ on CPU): outputs and
    gradients equal the eager neck's and those of mmdet's ``DyHead`` with
    the same weights to float32 rounding. The pyramid ends in a 1x1 level
    (the high branch's resize of a 1x1 map) and the two blocks share one
    compiled graph."""
    from mmdet.models.necks import DyHead

    torch._dynamo.reset()
    channels = 16
    eager = DyHeadNeck(channels, channels, num_blocks=2, dcn_backend='torch')
    compiled = DyHeadNeck(
        channels, channels, num_blocks=2, dcn_backend='torch', compile=True
    )
    # Three levels (5x6, 3x3, 2x2 .. 1x1 would be four): fewer kernels to
    # compile, and the coarsest is 1x1.
    feats = pyramid(2, channels, (3, 4), levels=3)
    assert tuple(feats[-1].shape[-2:]) == (1, 1)
    # mmdet's own initialisation (offset convs at zero: taps on pixels),
    # then random weights; the second run reuses the compiled graph.
    # From mmdet's initialisation only the offset convs' gradients are
    # compared: the attentions' then depend on rounding (mmdet's DyHead and
    # the eager neck differ there as much as compiled and eager do).
    torch.manual_seed(0)
    theirs = DyHead(channels, channels, num_blocks=2)
    _check_against(theirs, eager, compiled, feats, tol=None)
    _randomise(theirs)
    _check_against(theirs, eager, compiled, feats, tol=1e-3)


def _check_against(theirs, eager, compiled, feats, tol):
    """Outputs and gradients of ``compiled``, ``eager`` and mmdet's
    ``theirs`` with ``theirs``' weights; ``tol`` for all parameter
    gradients (None: the offset convs' only)."""
    from mmdet_dyhead.models.key_mapping import from_mmdet_keys

    eager.load_state_dict(theirs.state_dict())
    compiled.load_state_dict(theirs.state_dict())

    got = _fwd_bwd(compiled, dict(compiled.named_parameters()), feats)
    want = _fwd_bwd(eager, dict(eager.named_parameters()), feats)
    ref_params = dict(theirs.named_parameters())
    ref = _fwd_bwd(theirs, ref_params, feats)
    ref_grads = from_mmdet_keys(ref[2])
    # Against the largest output: from mmdet's initialisation the 1x1
    # level's output is zero in exact arithmetic (GroupNorm of one value
    # per group), only rounding noise.
    out_scale = max(float(o.abs().max()) for o in want[0])
    for a, b, c in zip(got[0], want[0], ref[0]):
        assert float((a - b).abs().max()) < 1e-5 * out_scale
        assert float((a - c).abs().max()) < 1e-5 * out_scale
    # Input gradients against the largest of them: the 1x1 level's is zero
    # in exact arithmetic (GroupNorm of one value per group) and holds only
    # rounding noise.
    scale = max(float(g.abs().max()) for g in want[1])
    for i, (a, b, c) in enumerate(zip(got[1], want[1], ref[1])):
        assert float((a - b).abs().max()) < 1e-5 * scale, i
        assert float((a - c).abs().max()) < 1e-5 * scale, i
    # The offset convs, where the grid_sample form differed by 9-29 % from
    # zero offsets.
    offset_grads = [n for n in got[2] if 'offset' in n]
    assert offset_grads
    for name in offset_grads:
        assert rel_err(got[2][name], want[2][name]) < 1e-4, name
        assert rel_err(got[2][name], ref_grads[name]) < 1e-4, name
    if tol is None:
        return
    for name, grad in got[2].items():
        assert _grad_err(grad, want[2][name], want[2]) < tol, name
        assert _grad_err(grad, ref_grads[name], ref_grads) < tol, name


def test_compile_argument_is_checked():
    with pytest.raises(TypeError, match='compile must be True, False'):
        DyHeadNeck(16, 16, num_blocks=1, compile='yes')


def test_unknown_compile_mode_is_refused_with_the_choices():
    """Issue 33: only inductor reads ``mode``; with another backend torch
    accepts a misspelt one without a word. The choices are torch's
    (``torch.compile``'s docstring points to
    ``torch._inductor.list_mode_options``)."""
    from torch._inductor import list_mode_options

    bogus = dict(mode='bogus', backend='aot_eager')
    torch.compile(lambda x: x, **bogus)  # what torch itself accepts
    with pytest.raises(ValueError, match="mode='bogus' does not exist") as e:
        DyHeadNeck(16, 16, num_blocks=1, compile=bogus)
    for mode in list_mode_options():
        assert repr(mode) in str(e.value)
    assert "'max-autotune'" in str(e.value)
    for mode in (None, 'default', 'max-autotune-no-cudagraphs'):
        DyHeadNeck(16, 16, num_blocks=1, compile=dict(bogus, mode=mode))


@pytest.mark.slow
def test_train_tool_with_compile_in_the_config(tmp_path):
    """mmengine's ``compile`` config key (``torch.compile`` of
    ``train_step``) through the package's tools/train.py, then
    tools/test.py on its checkpoint, for the tiny ATSS + DyHead: the run
    says it compiled, its losses equal the eager run's, and it tests with
    COCO AP."""
    import os.path as osp
    import re

    from mmdet_dyhead.cli import test as test_tool
    from mmdet_dyhead.cli import train as train_tool
    from projects.synthetic_coco import (
        generate_synthetic_coco,
        tiny_detector_cfg,
    )
    from tests.helpers import REPO_ROOT

    data = generate_synthetic_coco(
        str(tmp_path / 'data'),
        num_train=4,
        num_val=2,
        image_size=64,
        objects_per_image=(2, 3),
    )
    logs, configs = {}, {}
    for name in ('eager', 'compiled'):
        cfg = tiny_detector_cfg(
            osp.join(
                REPO_ROOT, 'configs/atss/atss_r50_fpn_dyhead-6b_1x_coco.py'
            ),
            data,
            str(tmp_path / name),
            iters=2,
            checkpoint_interval=2,
        )
        cfg.experiment_name = f'compile-test-{name}'
        cfg.log_level = 'INFO'
        if name == 'compiled':
            cfg.compile = dict(backend='aot_eager')
        configs[name] = str(tmp_path / f'{name}.py')
        cfg.dump(configs[name])
        train_tool.main([configs[name]])
        (log,) = (tmp_path / name).glob('*/*.log')
        logs[name] = log.read_text()
    assert 'Model has been "compiled"' in logs['compiled']
    assert 'Model has been "compiled"' not in logs['eager']

    def losses(text):
        return [
            float(v)
            for v in re.findall(r'Iter\(train\).*?\bloss: ([-\d.eE+]+)', text)
        ]

    eager, compiled = losses(logs['eager']), losses(logs['compiled'])
    assert len(eager) == len(compiled) == 2
    for a, b in zip(compiled, eager):
        assert abs(a - b) <= 1e-3 * abs(b), (compiled, eager)
    test_tool.main(
        [configs['compiled'], str(tmp_path / 'compiled' / 'iter_2.pth')]
    )
    (log,) = sorted((tmp_path / 'compiled').glob('*/*.log'))[-1:]
    assert 'coco/bbox_mAP' in log.read_text()
