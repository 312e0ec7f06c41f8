"""DyHeadNeck shapes, switches, presets, and its errors on bad input."""

import pytest
import torch

from mmdet_dyhead.models import DyHeadNeck
from mmdet_dyhead.models.key_mapping import to_mmdet_keys
from mmdet_dyhead.models.necks import DYHEAD_PRESETS
from mmdet_dyhead.registry import MODELS
from tests.helpers import pyramid, rel_err


@pytest.mark.parametrize('levels', [3, 4, 5, 6])
@pytest.mark.parametrize('size', [(64, 64), (37, 53), (1, 3)])
def test_shapes_for_3_to_6_levels_and_odd_sizes(levels, size):
    neck = DyHeadNeck(
        16, 24, num_blocks=2, norm_cfg=dict(type='GN', num_groups=8)
    )
    feats = pyramid(2, 16, size, levels=levels)
    outs = neck(feats)
    assert [o.shape for o in outs] == [(2, 24) + f.shape[-2:] for f in feats]


@pytest.mark.parametrize(
    'scale,spatial,task',
    [
        (True, False, False),
        (False, True, False),
        (False, False, True),
        (False, True, True),
        (True, False, True),
        (True, True, False),
        (True, True, True),
    ],
)
def test_table1_switches_build_run_and_drop_their_parameters(
    scale, spatial, task
):
    neck = DyHeadNeck(
        16,
        16,
        num_blocks=1,
        use_scale_attn=scale,
        use_spatial_attn=spatial,
        use_task_attn=task,
    )
    keys = '\n'.join(neck.state_dict())
    assert ('scale_attn' in keys) == scale
    assert ('offset_conv' in keys) == spatial
    assert ('task_attn' in keys) == task
    outs = neck(pyramid(1, 16, (16, 16), levels=3))
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize('preset', list(DYHEAD_PRESETS))
def test_presets_build_train_and_differ_where_documented(preset):
    neck = DyHeadNeck(16, 16, num_blocks=2, preset=preset)
    feats = pyramid(2, 16, (20, 28), levels=4, requires_grad=True)
    sum(o.sum() for o in neck(feats)).backward()
    assert all(
        p.grad is not None for p in neck.parameters() if p.requires_grad
    )
    has_bias = any(k.endswith('branch.conv.bias') for k in neck.state_dict())
    assert has_bias == DYHEAD_PRESETS[preset]['dcn_bias']


@pytest.mark.parametrize(
    'kwargs',
    [
        dict(preset='mmdet'),
        dict(preset='paper'),
        dict(use_scale_attn=False),
        dict(use_spatial_attn=False, use_task_attn=False),
    ],
)
def test_forward_with_attention_returns_forward_bit_for_bit(kwargs):
    neck = DyHeadNeck(
        16,
        16,
        num_blocks=3,
        norm_cfg=dict(type='GN', num_groups=8),
        zero_init_offset=False,
        **kwargs,
    ).eval()
    feats = pyramid(2, 16, (19, 26), levels=4)
    with torch.no_grad():
        plain = neck(feats)
        outs, attentions = neck.forward_with_attention(feats)
    assert all(torch.equal(a, b) for a, b in zip(plain, outs))
    assert len(attentions) == 3
    # Stages chain: each block reads what the previous one returned.
    assert all(a is b for a, b in zip(attentions[0].inputs, feats))
    for prev, cur in zip(attentions, attentions[1:]):
        assert all(a is b for a, b in zip(cur.inputs, prev.outputs))
    assert all(a is b for a, b in zip(attentions[-1].outputs, outs))
    scale = neck.dyhead_blocks[0].scale_attn is not None
    task = neck.dyhead_blocks[0].task_attn is not None
    for attn in attentions:
        # 4 levels: 4 mid terms, 3 low, 3 high.
        assert len(attn.scale_weights) == (10 if scale else 0)
        assert len(attn.task_coefficients) == (4 if task else 0)


def test_table2_block_count_is_a_config_value():
    for n in (1, 2, 4):
        neck = MODELS.build(
            dict(
                type='DyHeadNeck',
                in_channels=8,
                out_channels=8,
                num_blocks=n,
                norm_cfg=dict(type='GN', num_groups=4),
            )
        )
        assert len(neck.dyhead_blocks) == n


def test_aligned_and_legacy_agree_except_on_the_high_branch():
    legacy = DyHeadNeck(16, 16, num_blocks=1, zero_init_offset=False)
    aligned = DyHeadNeck(
        16, 16, num_blocks=1, offset_mode='aligned', zero_init_offset=False
    )
    aligned.load_state_dict(legacy.state_dict())
    feats = pyramid(1, 16, (16, 16), levels=3)
    a, b = legacy(feats), aligned(feats)
    # The top level has no coarser neighbour, so no high branch: identical.
    assert rel_err(a[-1], b[-1]) < 1e-6
    assert rel_err(a[0], b[0]) > 1e-4


def test_with_cp_gives_the_same_gradients():
    neck = DyHeadNeck(
        8, 8, num_blocks=2, norm_cfg=dict(type='GN', num_groups=4)
    )
    neck_cp = DyHeadNeck(
        8,
        8,
        num_blocks=2,
        with_cp=True,
        norm_cfg=dict(type='GN', num_groups=4),
    )
    neck_cp.load_state_dict(neck.state_dict())
    feats = pyramid(1, 8, (16, 16), levels=3)
    for m in (neck, neck_cp):
        sum(
            o.square().sum()
            for o in m([f.clone().requires_grad_() for f in feats])
        ).backward()
    for (n, p), q in zip(neck.named_parameters(), neck_cp.parameters()):
        assert rel_err(q.grad, p.grad) < 1e-5, n


def test_errors_name_the_problem_and_the_fix():
    neck = DyHeadNeck(16, 16, num_blocks=1, num_levels=3)
    with pytest.raises(ValueError, match='in_channels=16'):
        neck(pyramid(1, 8, (16, 16), levels=3))
    with pytest.raises(ValueError, match='built for 3 levels but got 4'):
        neck(pyramid(1, 16, (16, 16), levels=4))
    bad = pyramid(1, 16, (16, 16), levels=3)
    bad[2] = torch.randn(1, 16, 2, 2)
    with pytest.raises(ValueError, match=r'ceil\(previous / 2\)'):
        neck(bad)
    with pytest.raises(ValueError, match='same channel count'):
        DyHeadNeck([256, 512], 256)
    with pytest.raises(
        ValueError, match="offset_mode='diagonal' does not exist"
    ):
        DyHeadNeck(16, 16, offset_mode='diagonal')
    with pytest.raises(ValueError, match="dcn_backend='cuda' does not exist"):
        DyHeadNeck(16, 16, dcn_backend='cuda')
    with pytest.raises(ValueError, match="preset='v2' does not exist"):
        DyHeadNeck(16, 16, preset='v2')
    with pytest.raises(ValueError, match="hsigmoid='sigmoid' does not exist"):
        DyHeadNeck(16, 16, hsigmoid='sigmoid')
    with pytest.raises(TypeError, match='unknown arguments'):
        DyHeadNeck(16, 16, num_block=3)


@pytest.mark.parametrize('bad', [0, 2.5, '6', True, None])
def test_num_blocks_that_is_not_a_positive_int_is_named(bad):
    with pytest.raises(ValueError, match=r'num_blocks must be a whole'):
        DyHeadNeck(16, 16, num_blocks=bad)


def test_a_one_level_pyramid_runs_and_matches_mmdet():
    """One level: only the mid branch (no finer or coarser neighbour), as
    in mmdet's DyHead."""
    from mmdet.models.necks import DyHead

    torch.manual_seed(0)
    ours = DyHeadNeck(16, 16, num_blocks=2, zero_init_offset=False).eval()
    ref = DyHead(16, 16, num_blocks=2, zero_init_offset=False).eval()
    ref.load_state_dict(to_mmdet_keys(ours.state_dict()))
    x = [torch.randn(2, 16, 12, 10)]
    with torch.no_grad():
        got, want = ours(x), ref(x)
    assert len(got) == 1
    assert rel_err(got[0], want[0]) < 1e-5


def test_levels_with_different_batch_sizes_are_named():
    """Issue 33: said up front, not as a DCN offset/mask shape mismatch
    from inside the operator."""
    neck = DyHeadNeck(16, 16, num_blocks=1)
    feats = pyramid(2, 16, (16, 16), levels=3)
    feats[1] = feats[1][:1]
    with pytest.raises(ValueError, match=r'batch sizes \[2, 1, 2\]'):
        neck(feats)


@pytest.mark.parametrize('training', [False, True])
def test_empty_batch_gives_empty_levels_like_torch_convolutions(training):
    """Issue 33: N = 0 returns (0, C_out, H_l, W_l) per level, as torch's
    convolutions do for an empty batch; in training a backward through
    them gives every parameter a zero gradient, as a convolution gives its
    weight (DDP expects every parameter to receive one)."""
    neck = DyHeadNeck(
        16, 24, num_blocks=2, norm_cfg=dict(type='GN', num_groups=8)
    ).train(training)
    feats = pyramid(0, 16, (20, 13), levels=4, requires_grad=training)
    conv = torch.nn.Conv2d(16, 24, 3, padding=1)
    want = [conv(f) for f in feats]
    outs = neck(feats)
    assert [o.shape for o in outs] == [w.shape for w in want]
    assert all(o.dtype == f.dtype for o, f in zip(outs, feats))
    if not training:
        return
    sum(w.sum() for w in want).backward()
    sum(o.sum() for o in outs).backward()
    assert torch.equal(conv.weight.grad, torch.zeros_like(conv.weight))
    for name, p in neck.named_parameters():
        assert p.grad is not None, name
        assert torch.equal(p.grad, torch.zeros_like(p)), name
    for f in feats:
        assert torch.equal(f.grad, torch.zeros_like(f))
