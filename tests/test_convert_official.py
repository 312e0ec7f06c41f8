"""tools/convert_official_dyhead.py against a synthetic detectron2 checkpoint.

The source state dict is written here from the layout of the official
release (detectron2 ResNet-50 ``bottom_up``, FPN ``fpn_lateral/output``,
``top_block.p6/p7``, ``dyhead_tower``, ATSS ``head``), not derived from the
converter, and one converted block is checked against the official block's
equations written out with mmcv's DCN op.
"""

import os.path as osp
import re

import pytest
import torch
import torch.nn.functional as F

from mmdet_dyhead.checkpoint import convert
from mmdet_dyhead.cli import convert_official_dyhead as tool
from tests.helpers import REPO_ROOT, rel_err

CONFIG = osp.join(
    REPO_ROOT, 'configs/atss/atss_r50-caffe_fpn_dyhead-6b_official_1x_coco.py'
)
CAFFE_MEAN = (103.53, 116.28, 123.675)


def official_atss_r50_state_dict(num_blocks=6, num_classes=80, c=256):
    """A detectron2-layout ATSS R-50 + DyHead state dict with random values."""
    sd = {}

    def conv(name, co, ci, k, bias=False):
        sd[name + '.weight'] = torch.randn(co, ci, k, k) / (ci * k * k) ** 0.5
        if bias:
            sd[name + '.bias'] = torch.randn(co) * 0.01

    def frozen_bn(name, ch):
        sd[name + '.weight'] = 1 + 0.1 * torch.randn(ch)
        sd[name + '.bias'] = 0.1 * torch.randn(ch)
        sd[name + '.running_mean'] = 0.1 * torch.randn(ch)
        sd[name + '.running_var'] = torch.rand(ch) + 0.5

    bu = 'backbone.backbone.bottom_up.'
    conv(bu + 'stem.conv1', 64, 3, 7)
    frozen_bn(bu + 'stem.conv1.norm', 64)
    in_ch = 64
    for stage, (blocks, mid, out) in zip(
        (2, 3, 4, 5),
        ((3, 64, 256), (4, 128, 512), (6, 256, 1024), (3, 512, 2048)),
    ):
        for j in range(blocks):
            p = f'{bu}res{stage}.{j}.'
            if j == 0:
                conv(p + 'shortcut', out, in_ch, 1)
                frozen_bn(p + 'shortcut.norm', out)
            conv(p + 'conv1', mid, in_ch if j == 0 else out, 1)
            frozen_bn(p + 'conv1.norm', mid)
            conv(p + 'conv2', mid, mid, 3)
            frozen_bn(p + 'conv2.norm', mid)
            conv(p + 'conv3', out, mid, 1)
            frozen_bn(p + 'conv3.norm', out)
        in_ch = out
    for lvl, ch in zip((3, 4, 5), (512, 1024, 2048)):
        conv(f'backbone.backbone.fpn_lateral{lvl}', c, ch, 1, bias=True)
        conv(f'backbone.backbone.fpn_output{lvl}', c, c, 3, bias=True)
    conv('backbone.backbone.top_block.p6', c, c, 3, bias=True)
    conv('backbone.backbone.top_block.p7', c, c, 3, bias=True)
    for i in range(num_blocks):
        t = f'backbone.dyhead_tower.{i}.'
        for k in range(3):
            conv(f'{t}DyConv.{k}.conv', c, c, 3, bias=True)
            sd[f'{t}DyConv.{k}.bn.weight'] = 1 + 0.1 * torch.randn(c)
            sd[f'{t}DyConv.{k}.bn.bias'] = 0.1 * torch.randn(c)
        conv(t + 'AttnConv.1', 1, c, 1, bias=True)
        sd[t + 'relu.fc.0.weight'] = torch.randn(c // 4, c) / c**0.5
        sd[t + 'relu.fc.0.bias'] = 0.1 * torch.randn(c // 4)
        sd[t + 'relu.fc.2.weight'] = (
            torch.randn(4 * c, c // 4) / (c // 4) ** 0.5
        )
        sd[t + 'relu.fc.2.bias'] = 0.1 * torch.randn(4 * c)
        # large enough offsets that sampling leaves the integer grid
        sd[t + 'offset.weight'] = torch.randn(27, c, 3, 3) * 0.05
        sd[t + 'offset.bias'] = torch.randn(27) * 0.5
    conv('head.cls_logits', num_classes, c, 1, bias=True)
    conv('head.bbox_pred', 4, c, 1, bias=True)
    conv('head.centerness', 1, c, 1, bias=True)
    for k in range(5):
        sd[f'head.scales.{k}.scale'] = torch.tensor([1.0 + 0.1 * k])
    sd['pixel_mean'] = torch.tensor(CAFFE_MEAN).view(3, 1, 1)
    sd['pixel_std'] = torch.ones(3, 1, 1)
    return sd


@pytest.fixture(scope='module')
def official():
    torch.manual_seed(1)
    return official_atss_r50_state_dict()


@pytest.fixture(scope='module')
def converted(official):
    return convert.convert_state_dict(official)


@pytest.fixture(scope='module')
def model():
    from mmdet.apis import init_detector

    return init_detector(CONFIG, device='cpu')


def test_every_tensor_mapped_once_shapes_fit_nothing_left(
    official, converted, model
):
    state, dropped = converted
    own = model.state_dict()
    assert set(state) == set(own)
    bad = {
        k: (tuple(v.shape), tuple(own[k].shape))
        for k, v in state.items()
        if v.shape != own[k].shape
    }
    assert not bad
    assert sorted(dropped) == ['pixel_mean', 'pixel_std']
    # Each source tensor lands in exactly one target (views share storage);
    # the only extra targets are BN step counters detectron2 does not keep.
    src_ptrs = [
        v.untyped_storage().data_ptr()
        for k, v in official.items()
        if k not in dropped
    ]
    dst = {
        k: v for k, v in state.items() if not k.endswith('num_batches_tracked')
    }
    dst_ptrs = [v.untyped_storage().data_ptr() for v in dst.values()]
    assert len(src_ptrs) == len(dst_ptrs) == len(set(dst_ptrs))
    assert set(src_ptrs) == set(dst_ptrs)
    n_bn = sum(k.endswith('running_var') for k in official)
    assert sum(k.endswith('num_batches_tracked') for k in state) == n_bn


def test_documented_correspondences(official, converted):
    state, _ = converted
    blk, tw = 'neck.1.dyhead_blocks.3.', 'backbone.dyhead_tower.3.'
    pairs = {
        'backbone.backbone.bottom_up.res2.0.shortcut.weight': (
            'backbone.layer1.0.downsample.0.weight'
        ),
        'backbone.backbone.bottom_up.res5.2.conv2.norm.running_var': (
            'backbone.layer4.2.bn2.running_var'
        ),
        'backbone.backbone.bottom_up.stem.conv1.norm.bias': (
            'backbone.bn1.bias'
        ),
        'backbone.backbone.fpn_lateral3.weight': (
            'neck.0.lateral_convs.0.conv.weight'
        ),
        'backbone.backbone.fpn_output5.bias': 'neck.0.fpn_convs.2.conv.bias',
        'backbone.backbone.top_block.p6.weight': (
            'neck.0.fpn_convs.3.conv.weight'
        ),
        'backbone.backbone.top_block.p7.weight': (
            'neck.0.fpn_convs.4.conv.weight'
        ),
        tw + 'DyConv.0.conv.weight': blk
        + 'spatial_attn.high_branch.conv.weight',
        tw + 'DyConv.1.conv.bias': blk + 'spatial_attn.mid_branch.conv.bias',
        tw + 'DyConv.2.bn.weight': blk + 'spatial_attn.low_branch.norm.weight',
        tw + 'offset.weight': blk + 'spatial_attn.offset_conv.weight',
        tw + 'AttnConv.1.weight': blk + 'scale_attn.fc.weight',
        'head.cls_logits.weight': 'bbox_head.atss_cls.weight',
        'head.bbox_pred.bias': 'bbox_head.atss_reg.bias',
        'head.centerness.weight': 'bbox_head.atss_centerness.weight',
    }
    for src, dst in pairs.items():
        assert torch.equal(official[src], state[dst]), (src, dst)
    assert torch.equal(
        official[tw + 'relu.fc.2.weight'][:, :, None, None],
        state[blk + 'task_attn.fc2.weight'],
    )
    assert state['bbox_head.scales.4.scale'].shape == ()
    assert state['bbox_head.scales.4.scale'].item() == pytest.approx(1.4)


def _hsig(x):
    return F.relu6(x + 3) / 6


def official_block(feats, sd, t):
    """The released DyConv block, per output level, from its weights."""
    from mmcv.ops import modulated_deform_conv2d

    def branch(x, k, stride, offset, mask):
        y = modulated_deform_conv2d(
            x,
            offset,
            mask,
            sd[f'{t}DyConv.{k}.conv.weight'],
            sd[f'{t}DyConv.{k}.conv.bias'],
            stride,
            1,
            1,
            1,
            1,
        )
        return F.group_norm(
            y, 16, sd[f'{t}DyConv.{k}.bn.weight'], sd[f'{t}DyConv.{k}.bn.bias']
        )

    outs = []
    for lvl, x in enumerate(feats):
        om = F.conv2d(
            x, sd[t + 'offset.weight'], sd[t + 'offset.bias'], padding=1
        )
        offset, mask = (
            om[:, :18].contiguous(),
            om[:, 18:].sigmoid().contiguous(),
        )
        terms = [branch(x, 1, 1, offset, mask)]
        if lvl > 0:
            terms.append(branch(feats[lvl - 1], 2, 2, offset, mask))
        if lvl < len(feats) - 1:
            # level-l offsets handed to the coarser level's conv, as released
            terms.append(
                F.interpolate(
                    branch(feats[lvl + 1], 0, 1, offset, mask),
                    size=x.shape[-2:],
                    mode='bilinear',
                    align_corners=True,
                )
            )
        weighted = [
            term
            * _hsig(
                F.relu(
                    F.conv2d(
                        term.mean((2, 3), keepdim=True),
                        sd[t + 'AttnConv.1.weight'],
                        sd[t + 'AttnConv.1.bias'],
                    )
                )
            )
            for term in terms
        ]
        fused = sum(weighted) / len(weighted)
        hidden = F.relu(
            F.linear(
                fused.mean((2, 3)),
                sd[t + 'relu.fc.0.weight'],
                sd[t + 'relu.fc.0.bias'],
            )
        )
        y = _hsig(
            F.linear(
                hidden, sd[t + 'relu.fc.2.weight'], sd[t + 'relu.fc.2.bias']
            )
        )
        a1, b1, a2, b2 = (
            v[:, :, None, None] for v in torch.split(y, fused.shape[1], dim=1)
        )
        a1, a2 = (a1 - 0.5) * 2 + 1, (a2 - 0.5) * 2
        outs.append(
            torch.maximum(fused * a1 + b1 - 0.5, fused * a2 + b2 - 0.5)
        )
    return outs


def test_converted_block_computes_the_official_block(
    official, converted, model
):
    state, _ = converted
    from mmdet_dyhead.checkpoint import load_state_dict

    load_state_dict(model, state, strict=True)
    feats = [
        torch.randn(1, 256, h, w)
        for h, w in ((16, 20), (8, 10), (4, 5), (2, 3), (1, 2))
    ]
    with torch.no_grad():
        ours = model.neck[1].dyhead_blocks[2](feats)
        ref = official_block(feats, official, 'backbone.dyhead_tower.2.')
    for level, (a, b) in enumerate(zip(ours, ref)):
        assert rel_err(a, b) < 1e-4, level


def test_cli_writes_a_hash_named_checkpoint_the_model_loads_and_runs(
    official, model, tmp_path
):
    from mmdet.structures import DetDataSample

    from mmdet_dyhead.checkpoint import load_checkpoint, sha256_of

    src = tmp_path / 'dyhead_r50_atss_fpn_1x.pth'
    torch.save(
        {'model': official, 'iteration': 89999, '__author__': 'test'}, src
    )
    assert (
        tool.main([str(src), str(tmp_path / 'converted.pth'), '--hash-name'])
        == 0
    )
    (out,) = [p for p in tmp_path.iterdir() if p.name.startswith('converted-')]
    prefix = re.fullmatch(r'converted-([0-9a-f]{8})\.pth', out.name)
    assert prefix and sha256_of(str(out)).startswith(prefix.group(1))
    report = load_checkpoint(model, str(out))
    assert report.ok
    img = torch.randint(0, 255, (3, 60, 90), dtype=torch.uint8)
    sample = DetDataSample(
        metainfo=dict(
            img_shape=(60, 90), ori_shape=(60, 90), scale_factor=(1.0, 1.0)
        )
    )
    data = model.data_preprocessor(
        dict(inputs=[img], data_samples=[sample]), False
    )
    assert data['inputs'].shape[-2:] == (
        128,
        128,
    )  # padded to the largest stride
    with torch.no_grad():
        (result,) = model(**data, mode='predict')
    boxes = result.pred_instances.bboxes
    assert boxes.shape[1] == 4 and torch.isfinite(boxes).all()


def test_unknown_tensor_is_refused_by_name(official):
    bad = dict(official)
    bad['head.cls_subnet.0.weight'] = torch.zeros(256, 256, 3, 3)
    with pytest.raises(
        convert.ConversionError,
        match=r'(?s)head\.cls_subnet\.0: weight.*RetinaNet',
    ):
        convert.convert_state_dict(bad)


def test_wrong_pixel_statistics_are_refused(official):
    bad = dict(official)
    bad['pixel_mean'] = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    with pytest.raises(convert.ConversionError, match='caffe BGR'):
        convert.convert_state_dict(bad)


def test_non_official_checkpoints_are_refused(tmp_path, converted):
    mmdet_style = tmp_path / 'mmdet.pth'
    torch.save(
        {'state_dict': dict(list(converted[0].items())[:5])}, mmdet_style
    )
    with pytest.raises(convert.ConversionError, match='need no conversion'):
        convert.load_official(str(mmdet_style))
    pkl = tmp_path / 'R-50.pkl'
    pkl.write_bytes(b'\x80\x04junk')
    with pytest.raises(convert.ConversionError, match='plain pickles'):
        convert.load_official(str(pkl))


def test_anchor_buffers_are_dropped_at_the_top_level_and_under_head(
    official, converted
):
    with_anchors = dict(official)
    anchors = {
        'anchor_generator.cell_anchors.0': torch.randn(1, 4),
        'anchor_generator.cell_anchors.4': torch.randn(1, 4),
        'head.anchor_generator.cell_anchors.1': torch.randn(1, 4),
    }
    with_anchors.update(anchors)
    state, dropped = convert.convert_state_dict(with_anchors)
    assert sorted(dropped) == sorted(['pixel_mean', 'pixel_std', *anchors])
    assert list(state) == list(converted[0])
    # anything else named like them still has no rule
    bad = dict(official, **{'neck.anchor_generator.cell_anchors.0': 0})
    with pytest.raises(convert.ConversionError, match='neck.anchor_generator'):
        convert.convert_state_dict(bad)


def test_an_extra_block_is_reported_as_a_block_count_mismatch(
    tmp_path, capsys
):
    torch.manual_seed(2)
    src = tmp_path / 'dyhead_7_blocks.pth'
    torch.save({'model': official_atss_r50_state_dict(num_blocks=7)}, src)
    assert tool.main([str(src), str(tmp_path / 'out.pth')]) == 1
    err = capsys.readouterr().err
    assert (
        'The checkpoint has 7 DyHead blocks (neck.1.dyhead_blocks.0-6) but '
        'the model has 6' in err
    )
    assert 'num_blocks=7' in err
    assert 'DCN biases' not in err  # the old, wrong hint
    assert not (tmp_path / 'out.pth').exists()


def test_a_missing_block_and_stray_keys_get_the_right_hints(official, model):
    from mmdet_dyhead.checkpoint import CheckpointKeyError, KeyReport
    from mmdet_dyhead.checkpoint import load_state_dict as load

    state, _ = convert.convert_state_dict(official)
    five = {k: v for k, v in state.items() if '.dyhead_blocks.5.' not in k}
    with pytest.raises(CheckpointKeyError) as info:
        load(model, five, strict=True)
    text = str(info.value)
    assert (
        'The model has 6 DyHead blocks (neck.1.dyhead_blocks.0-5) but the '
        'checkpoint has only 5' in text
    )
    assert 'num_blocks=5' in text and 'DCN biases' not in text
    # one stray tensor in a block is not a block count
    stray = KeyReport(unexpected=['neck.1.dyhead_blocks.3.extra.weight'])
    assert not any('blocks' in h for h in stray.hints())
    # DCN biases alone still point at the preset
    biases = KeyReport(
        unexpected=[
            f'neck.1.dyhead_blocks.{i}.spatial_attn.{b}_branch.conv.bias'
            for i in range(6)
            for b in ('high', 'mid', 'low')
        ]
    )
    (hint,) = biases.hints()
    assert "preset='official'" in hint


def test_a_ddp_saved_official_file_converts_with_the_prefix_stripped(
    official, converted, tmp_path, capsys
):
    src = tmp_path / 'ddp.pth'
    torch.save({f'module.{k}': v for k, v in official.items()}, src)
    state = convert.load_official(str(src))
    assert list(state) == list(official)
    assert all(torch.equal(state[k], official[k]) for k in official)
    assert "every key starts with DDP's 'module.'" in capsys.readouterr().err
    assert list(convert.convert_state_dict(state)[0]) == list(converted[0])
    # another wrapper prefix is named, with the fix
    other = tmp_path / 'wrapped.pth'
    torch.save(
        {'model': {f'detector.{k}': v for k, v in official.items()}}, other
    )
    with pytest.raises(
        convert.ConversionError,
        match=r"extra prefix 'detector\.'.*strip 'detector\.' from every key",
    ):
        convert.load_official(str(other))
