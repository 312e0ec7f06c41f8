"""Our neck (preset='mmdet') against mmdet 3.3's own DyHead, same weights."""

import pytest
import torch

from mmdet_dyhead.models import DyHeadNeck
from mmdet_dyhead.models.key_mapping import from_mmdet_keys, to_mmdet_keys
from mmdet_dyhead.ops import mmcv_ops_available
from tests.helpers import pyramid, rel_err

pytestmark = pytest.mark.skipif(
    not mmcv_ops_available(), reason="mmdet's DyHead needs mmcv ops"
)


def _mmdet_dyhead(channels, num_blocks):
    from mmdet.models.necks import DyHead

    neck = DyHead(
        channels, channels, num_blocks=num_blocks, zero_init_offset=False
    )
    # Non-trivial weights everywhere: offsets of a few pixels, masks away from
    # 0.5, attention logits spread over their active ranges.
    with torch.no_grad():
        for name, p in neck.named_parameters():
            if 'spatial_conv_offset' in name:
                p.normal_(0, 0.05)
            elif 'norm' in name:
                p.copy_(
                    torch.randn_like(p) * 0.2
                    + (1.0 if name.endswith('weight') else 0.0)
                )
            elif 'attn' in name:
                p.normal_(0, 0.3)
    return neck.eval()


@pytest.mark.parametrize('backend', ['torch', 'mmcv'])
@pytest.mark.parametrize(
    'batch,size', [(1, (40, 56)), (2, (37, 51)), (3, (23, 33))]
)
def test_same_outputs_as_mmdet_dyhead(backend, batch, size):
    channels = 32
    theirs = _mmdet_dyhead(channels, num_blocks=2)
    ours = DyHeadNeck(
        channels, channels, num_blocks=2, dcn_backend=backend
    ).eval()
    result = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    feats = pyramid(batch, channels, size, levels=5)
    with torch.no_grad():
        expected = theirs(feats)
        got = ours(feats)
    assert len(got) == len(expected)
    for lvl, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape
        assert rel_err(a, b) < 1e-5, f'level {lvl}'


def test_recorded_scale_weights_are_mmdets_scale_attention_outputs():
    """The weights forward_with_attention reports are what mmdet's DyHead
    multiplies its branch outputs by: its scale_attn_module's outputs, in
    mmdet's order (per level: mid, low, high)."""
    channels = 16
    theirs = _mmdet_dyhead(channels, num_blocks=2)
    ours = DyHeadNeck(
        channels, channels, num_blocks=2, dcn_backend='torch'
    ).eval()
    ours.load_state_dict(theirs.state_dict())
    feats = pyramid(2, channels, (24, 20), levels=4)
    seen = [[] for _ in theirs.dyhead_blocks]
    handles = [
        block.scale_attn_module.register_forward_hook(
            lambda m, inputs, out, k=k: seen[k].append(out)
        )
        for k, block in enumerate(theirs.dyhead_blocks)
    ]
    with torch.no_grad():
        theirs(feats)
        _, attentions = ours.forward_with_attention(feats)
    for h in handles:
        h.remove()
    order = [
        (level, src)
        for level in range(4)
        for src in (level, level - 1, level + 1)
        if 0 <= src < 4
    ]
    for k, attn in enumerate(attentions):
        assert len(seen[k]) == len(order) == len(attn.scale_weights)
        for key, weight in zip(order, seen[k]):
            assert rel_err(attn.scale_weights[key], weight) < 1e-5, (k, key)


def test_gradients_match_mmdet_dyhead():
    channels = 16
    theirs = _mmdet_dyhead(channels, num_blocks=1).train()
    ours = DyHeadNeck(
        channels, channels, num_blocks=1, dcn_backend='torch'
    ).train()
    ours.load_state_dict(theirs.state_dict())
    feats = pyramid(2, channels, (24, 20), levels=4)
    sum(o.square().sum() for o in theirs(feats)).backward()
    sum(o.square().sum() for o in ours(feats)).backward()
    ours_grads = from_mmdet_keys(
        {k: p.grad for k, p in theirs.named_parameters()}
    )
    for name, p in ours.named_parameters():
        assert rel_err(p.grad, ours_grads[name]) < 1e-4, name


def test_gradients_match_mmdet_dyhead_from_its_default_init():
    """Both necks as a config builds them, through the registry and
    init_weights(): zero offset convs, so every tap sits on an integer
    position and the border taps exactly on -1, where mmcv's kernel gives
    no gradient. This is the state every training starts from."""
    import mmdet.models  # noqa: F401  (registers DyHead)
    from mmdet.registry import MODELS as MMDET_MODELS

    from mmdet_dyhead.registry import MODELS

    torch.manual_seed(0)
    # Not 16: GroupNorm's 16 groups would then normalise each channel on
    # its own, so a pyramid end's pooled attention input is 0 up to
    # rounding and the attention ReLUs (zero bias at init) sit on their
    # kink, where either side is a valid gradient.
    channels = 32
    theirs = MMDET_MODELS.build(
        dict(
            type='DyHead',
            in_channels=channels,
            out_channels=channels,
            num_blocks=2,
        )
    )
    theirs.init_weights()
    ours = MODELS.build(
        dict(
            type='DyHeadNeck',
            in_channels=channels,
            out_channels=channels,
            num_blocks=2,
            dcn_backend='torch',
        )
    )
    ours.init_weights()
    ours.load_state_dict(from_mmdet_keys(theirs.state_dict()))
    offset_convs = [
        p for n, p in theirs.named_parameters() if 'spatial_conv_offset' in n
    ]
    assert offset_convs and all(not p.any() for p in offset_convs)
    theirs.train()
    ours.train()
    feats = pyramid(2, channels, (24, 20), levels=4)
    projections = [torch.randn_like(f) for f in feats]
    outs_theirs = theirs(feats)
    outs_ours = ours(feats)
    for lvl, (a, b) in enumerate(zip(outs_ours, outs_theirs)):
        assert rel_err(a, b) < 1e-5, f'level {lvl}'
    sum((o * g).sum() for o, g in zip(outs_theirs, projections)).backward()
    sum((o * g).sum() for o, g in zip(outs_ours, projections)).backward()
    ref_grads = from_mmdet_keys(
        {k: p.grad for k, p in theirs.named_parameters()}
    )
    checked = 0
    for name, p in ours.named_parameters():
        assert ref_grads[name].abs().max() > 0, name
        assert rel_err(p.grad, ref_grads[name]) < 1e-5, name
        checked += 'offset' in name
    assert checked == 4  # weight and bias of both blocks' offset convs


def test_mmdet_checkpoint_keys_load_with_nothing_missing_or_left_over():
    from mmengine.runner.checkpoint import load_state_dict

    theirs = _mmdet_dyhead(32, num_blocks=6)
    ours = DyHeadNeck(32, 32, num_blocks=6)
    # mmengine's loader (used by load_from / init_cfg) raises on any
    # missing or unexpected key when strict.
    load_state_dict(ours, theirs.state_dict(), strict=True, logger=None)
    for k, v in from_mmdet_keys(theirs.state_dict()).items():
        assert torch.equal(ours.state_dict()[k], v)


def test_our_checkpoint_loads_into_mmdet_dyhead():
    ours = DyHeadNeck(32, 32, num_blocks=2)
    theirs = _mmdet_dyhead(32, num_blocks=2)
    result = theirs.load_state_dict(
        to_mmdet_keys(ours.state_dict()), strict=True
    )
    assert not result.missing_keys and not result.unexpected_keys


def test_default_init_matches_mmdet_init_rules():
    # zero_init_offset=True: offsets start at 0 and masks at 0.5 in both.
    from mmdet.models.necks import DyHead

    theirs = DyHead(32, 32, num_blocks=1)
    ours = DyHeadNeck(32, 32, num_blocks=1)
    for name, p in from_mmdet_keys(theirs.state_dict()).items():
        q = ours.state_dict()[name]
        if 'offset_conv' in name:
            assert torch.count_nonzero(p) == 0 and torch.count_nonzero(q) == 0
        elif (
            name.endswith('fc.weight')
            or 'fc1.weight' in name
            or 'fc2.weight' in name
        ):
            assert (
                abs(p.std().item() - q.std().item()) < 0.005
            )  # both N(0, 0.01)
