"""Each attention against the paper's equation written out by hand."""

import pytest
import torch
import torch.nn.functional as F

from mmdet_dyhead.models import (
    DynamicHeadBlock,
    ScaleAwareAttention,
    SpatialAwareAttention,
    TaskAwareAttention,
)
from mmdet_dyhead.ops import modulated_deform_conv2d
from tests.helpers import pyramid, rel_err


def _randomize(module, std=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


@pytest.mark.parametrize('style', ['official', 'paper'])
def test_scale_attention_is_eq3(style):
    attn = _randomize(ScaleAwareAttention(16, hsigmoid=style))
    x = torch.randn(3, 16, 7, 9) + 0.5
    w, b = attn.fc.weight.view(16), attn.fc.bias
    z = (x.mean(dim=(2, 3)) * w).sum(1) + b  # f(mean_S F), f linear
    if style == 'official':
        ref = torch.clamp((torch.relu(z) + 3) / 6, 0, 1)
    else:
        ref = torch.clamp((z + 1) / 2, 0, 1)  # sigma of Eq. 3
    assert rel_err(attn(x).view(3), ref) < 1e-6


@pytest.mark.parametrize('style', ['official', 'paper'])
def test_task_attention_is_eq5(style):
    c = 8
    attn = _randomize(TaskAwareAttention(c, ratio=4, hsigmoid=style))
    x = torch.randn(2, c, 5, 6)
    pooled = x.mean(dim=(2, 3))
    hidden = torch.relu(
        pooled @ attn.fc1.weight.view(2, c).t() + attn.fc1.bias
    )
    logits = hidden @ attn.fc2.weight.view(4 * c, 2).t() + attn.fc2.bias
    if style == 'official':
        y = torch.clamp((logits + 3) / 6, 0, 1)
    else:
        y = torch.clamp((logits + 1) / 2, 0, 1)
    y = y - 0.5
    a1, b1, a2, b2 = (
        y[:, :c] * 2 + 1,
        y[:, c : 2 * c],
        y[:, 2 * c : 3 * c] * 2,
        y[:, 3 * c :],
    )
    ref = torch.maximum(
        x * a1[..., None, None] + b1[..., None, None],
        x * a2[..., None, None] + b2[..., None, None],
    )
    assert rel_err(attn(x), ref) < 1e-6


def test_task_attention_matches_mmdet_dyrelu():
    from mmdet.models.layers import DyReLU

    theirs = _randomize(DyReLU(16))
    ours = TaskAwareAttention(16)
    ours.fc1.load_state_dict(theirs.conv1.conv.state_dict())
    ours.fc2.load_state_dict(theirs.conv2.conv.state_dict())
    x = torch.randn(2, 16, 4, 4)
    assert rel_err(ours(x), theirs(x)) < 1e-6


def test_task_attention_starts_as_relu():
    attn = TaskAwareAttention(8)
    torch.nn.init.zeros_(attn.fc2.weight)
    torch.nn.init.zeros_(attn.fc2.bias)
    x = torch.randn(2, 8, 3, 3)
    assert torch.allclose(attn(x), torch.relu(x))


def _dcn_reference(x, offset, mask, weight, stride):
    """Eq. 4's inner sum written per output pixel with bilinear sampling."""
    n, c, h, w = x.shape
    ho, wo = offset.shape[-2:]
    out = torch.zeros(n, weight.shape[0], ho, wo, dtype=x.dtype)
    xp = F.pad(x, (1, 1, 1, 1))  # index shift: pixel (y, x) -> (y + 1, x + 1)

    def bilinear(img, py, px):
        # img (c, h+2, w+2) zero-padded by one; coordinates in unpadded pixels.
        if py <= -1 or px <= -1 or py >= h or px >= w:
            return torch.zeros(img.shape[0], dtype=img.dtype)
        y0, x0 = int(torch.floor(py)), int(torch.floor(px))
        dy, dx = py - y0, px - x0
        val = torch.zeros(img.shape[0], dtype=img.dtype)
        for yy, xx, wt in (
            (y0, x0, (1 - dy) * (1 - dx)),
            (y0, x0 + 1, (1 - dy) * dx),
            (y0 + 1, x0, dy * (1 - dx)),
            (y0 + 1, x0 + 1, dy * dx),
        ):
            if 0 <= yy < h and 0 <= xx < w:
                val = val + wt * img[:, yy + 1, xx + 1]
        return val

    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                acc = torch.zeros(weight.shape[0], dtype=x.dtype)
                for k in range(9):
                    ky, kx = divmod(k, 3)
                    py = i * stride - 1 + ky + offset[b, 2 * k, i, j]
                    px = j * stride - 1 + kx + offset[b, 2 * k + 1, i, j]
                    acc += (
                        weight[:, :, ky, kx]
                        @ bilinear(xp[b], py, px)
                        * mask[b, k, i, j]
                    )
                out[b, :, i, j] = acc
    return out


def test_spatial_attention_terms_follow_eq4_aligned():
    torch.manual_seed(1)
    attn = SpatialAwareAttention(
        4, 4, offset_mode='aligned', norm_cfg=None, dcn_backend='torch'
    ).double()
    _randomize(attn.offset_conv, 0.2)
    feats = pyramid(1, 4, (6, 8), levels=3, dtype=torch.float64)
    offsets, masks = zip(*[attn.offsets_and_masks(f) for f in feats])
    offset, mask = offsets[1], masks[1]
    terms = dict(attn(feats, offsets, masks)[1])
    # mid: level 1 itself, offsets predicted on level 1.
    ref_mid = _dcn_reference(
        feats[1], offset, mask, attn.mid_branch.conv.weight, 1
    )
    # low: level 0 with stride 2 lands on level 1's grid with the same offsets.
    ref_low = _dcn_reference(
        feats[0], offset, mask, attn.low_branch.conv.weight, 2
    )
    # high: level 2 with level-1 offsets taken at (2i, 2j) and halved.
    off_hi, mask_hi = offset[:, :, ::2, ::2] / 2, mask[:, :, ::2, ::2]
    ref_high = F.interpolate(
        _dcn_reference(
            feats[2], off_hi, mask_hi, attn.high_branch.conv.weight, 1
        ),
        size=feats[1].shape[-2:],
        mode='bilinear',
        align_corners=True,
    )
    with torch.no_grad():
        assert rel_err(terms[1], ref_mid) < 1e-10
        assert rel_err(terms[0], ref_low) < 1e-10
        assert rel_err(terms[2], ref_high) < 1e-10


def _level_terms(sp, feats, level):
    """pi_S's terms for one output level, one DCN call per branch and map:
    the per-level form of SpatialAwareAttention.forward."""
    offset, mask = sp.offsets_and_masks(feats[level])

    def branch(b, x, off, m):
        c = b.conv
        y = modulated_deform_conv2d(
            x, off, m, c.weight, c.bias, c.stride, backend=c.backend
        )
        return b.norm(y)

    terms = [(level, branch(sp.mid_branch, feats[level], offset, mask))]
    if level > 0:
        low = branch(sp.low_branch, feats[level - 1], offset, mask)
        terms.append((level - 1, low))
    if level < len(feats) - 1:
        coarse = feats[level + 1]
        off_hi, mask_hi = sp.coarser_level_offsets(
            offset, mask, coarse.shape[-2:]
        )
        high = F.interpolate(
            branch(sp.high_branch, coarse, off_hi, mask_hi),
            size=feats[level].shape[-2:],
            mode='bilinear',
            align_corners=True,
        )
        terms.append((level + 1, high))
    return terms


@pytest.mark.parametrize('offset_mode', ['legacy', 'aligned'])
def test_spatial_attention_equals_its_per_level_form(offset_mode):
    """One DCN call per branch over all levels computes what one call per
    (branch, level) computes."""
    sp = SpatialAwareAttention(
        8,
        8,
        offset_mode=offset_mode,
        norm_cfg=dict(type='GN', num_groups=4),
        dcn_backend='torch',
    )
    _randomize(sp, 0.2)
    feats = pyramid(2, 8, (13, 11), levels=4)
    offsets, masks = zip(*[sp.offsets_and_masks(f) for f in feats])
    with torch.no_grad():
        got = sp(feats, offsets, masks)
        for level in range(4):
            want = _level_terms(sp, feats, level)
            assert [s for s, _ in got[level]] == [s for s, _ in want]
            for (_, a), (_, b) in zip(got[level], want):
                assert rel_err(a, b) < 1e-6


def test_block_is_the_composition_of_its_attentions():
    block = DynamicHeadBlock(
        8, 8, norm_cfg=dict(type='GN', num_groups=4), dcn_backend='torch'
    )
    _randomize(block, 0.1)
    feats = pyramid(2, 8, (12, 10), levels=3)
    out = block(feats)
    sp, sc, tk = block.spatial_attn, block.scale_attn, block.task_attn
    for lvl in range(3):
        terms = [t for _, t in _level_terms(sp, feats, lvl)]
        fused = sum(t * sc(t) for t in terms) / len(terms)
        assert rel_err(out[lvl], tk(fused)) < 1e-6


@pytest.mark.parametrize('order', ['spatial_first', 'scale_first'])
def test_recorded_attentions_reproduce_the_block_by_eq3_and_eq5(order):
    """forward_with_attention's weights and coefficients, put into Eq. 2
    (mean of weighted terms) and Eq. 5 (two-piece max), give the block's
    outputs; each weight is Eq. 3 of the feature it belongs to."""
    block = DynamicHeadBlock(
        8,
        8,
        attention_order=order,
        norm_cfg=dict(type='GN', num_groups=4),
        dcn_backend='torch',
    )
    _randomize(block, 0.3)
    feats = pyramid(2, 8, (12, 10), levels=3)
    with torch.no_grad():
        outs, attn = block.forward_with_attention(feats)
        assert all(a is b for a, b in zip(attn.inputs, feats))
        assert all(a is b for a, b in zip(attn.outputs, outs))
        for lvl in range(3):
            terms = _level_terms(block.spatial_attn, feats, lvl)
            fused = 0
            for src, term in terms:
                w = attn.scale_weights[(lvl, src)]
                source = feats[src] if order == 'scale_first' else term
                assert rel_err(w, block.scale_attn(source)) < 1e-6
                fused = fused + w * term / len(terms)
            a1, b1, a2, b2 = attn.task_coefficients[lvl]
            ref = torch.maximum(a1 * fused + b1, a2 * fused + b2)
            assert rel_err(outs[lvl], ref) < 1e-5
        assert set(attn.scale_weights) == {
            (0, 0), (0, 1), (1, 1), (1, 0), (1, 2), (2, 2), (2, 1)
        }  # fmt: skip


def test_scale_first_uses_one_weight_per_input_level():
    block = DynamicHeadBlock(
        8,
        8,
        attention_order='scale_first',
        norm_cfg=dict(type='GN', num_groups=4),
        dcn_backend='torch',
    )
    _randomize(block, 0.1)
    feats = pyramid(1, 8, (8, 8), levels=3)
    weights = [block.scale_attn(f) for f in feats]
    terms = _level_terms(block.spatial_attn, feats, 1)
    fused = sum(weights[src] * t for src, t in terms) / 3
    assert rel_err(block(feats)[1], block.task_attn(fused)) < 1e-6


def test_eq5_two_piece_max_gradients_equal_torch_maximum_including_ties():
    from mmdet_dyhead.models.layers.task_attention import TwoPieceMaxFunction

    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    x[0, 0, 0, :3] = 0.0  # with b1 == b2 below, both pieces tie at x == 0
    coeffs = [torch.randn(2, 3, 1, 1, dtype=torch.float64) for _ in range(4)]
    coeffs[3][0, 0] = coeffs[1][0, 0]
    leaves = [t.clone().requires_grad_() for t in (x, *coeffs)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, *coeffs)]
    out = TwoPieceMaxFunction.apply(*leaves)
    a1, b1, a2, b2 = ref_leaves[1:]
    ref = torch.maximum(a1 * ref_leaves[0] + b1, a2 * ref_leaves[0] + b2)
    # addcmul may fuse the multiply-add: equal up to one rounding.
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    for got, want in zip(leaves, ref_leaves):
        assert torch.allclose(got.grad, want.grad, rtol=0, atol=1e-12)
    # Away from ties the function is smooth: float64 gradcheck.
    smooth = [
        t.clone().requires_grad_()
        for t in (
            torch.randn(1, 2, 3, 3, dtype=torch.float64),
            *[torch.randn(1, 2, 1, 1, dtype=torch.float64) for _ in range(4)],
        )
    ]
    assert torch.autograd.gradcheck(TwoPieceMaxFunction.apply, smooth)
