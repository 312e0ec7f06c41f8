"""AttentionRecorder (paper Figures 3 and 4) and
tools/visualize_attention.py."""

import json
import os
import os.path as osp

import pytest
import torch

from mmdet_dyhead.models import DyHeadNeck
from mmdet_dyhead.visualization import AttentionRecorder, resolve_layer
from tests.helpers import REPO_ROOT, pyramid

pytest.importorskip('matplotlib')

GN8 = dict(type='GN', num_groups=8, requires_grad=True)


def random_neck(**kw):
    neck = DyHeadNeck(
        16, 16, num_blocks=3, norm_cfg=GN8, zero_init_offset=False, **kw
    ).eval()
    with torch.no_grad():
        # Spread the scale weights away from their init (all ~0.5); a small
        # positive bias keeps most logits clear of the ReLU in front of the
        # 'official' hard sigmoid and of the clamp of the 'paper' one.
        for block in neck.dyhead_blocks:
            block.scale_attn.fc.weight.normal_(0, 2.0)
            block.scale_attn.fc.bias.fill_(0.3)
    return neck


def reference_weights(neck, feats):
    """Scale weights per (block, out level, source level), recomputed by
    calling each block's scale attention on the features it weighs."""
    ref = {}
    with torch.no_grad():
        for k, block in enumerate(neck.dyhead_blocks, start=1):
            sp = block.spatial_attn
            ref[k] = {}
            offsets, masks = zip(*[sp.offsets_and_masks(f) for f in feats])
            for level, terms in enumerate(sp(feats, offsets, masks)):
                for src, term in terms:
                    source = (
                        feats[src]
                        if block.attention_order == 'scale_first'
                        else term
                    )
                    ref[k][(level, src)] = block.scale_attn(source).flatten()
            feats = block(feats)
    return ref


@pytest.mark.parametrize(
    'preset', ['mmdet', 'paper']
)  # spatial_first / scale_first
def test_scale_weights_match_direct_calls_and_leave_outputs_unchanged(preset):
    neck = random_neck(preset=preset)
    feats = pyramid(2, 16, (16, 24), levels=4)
    with torch.no_grad():
        plain = neck(feats)
        with AttentionRecorder(neck) as rec:
            recorded = neck(feats)
            rec.collect()
    # Recording keeps references to what the forward computes anyway: the
    # outputs are the same bits.
    assert all(torch.equal(a, b) for a, b in zip(plain, recorded))
    ref = reference_weights(neck, feats)
    for k in (1, 2, 3):
        assert set(rec.scale_weights[k]) == set(ref[k])
        for key, w in ref[k].items():
            (got,) = rec.scale_weights[k][key]
            assert torch.allclose(got, w, atol=1e-6), (k, key)
        assert len({round(float(w[0]), 4) for w in ref[k].values()}) >= 3, (
            'weights too similar for a meaningful check'
        )
        # The ratio: finest over coarsest term fused at each output level.
        ratios = rec.scale_ratios(k)
        pairs = {0: (0, 1), 1: (0, 2), 2: (1, 3), 3: (2, 3)}
        for level, (fine, coarse) in pairs.items():
            assert torch.allclose(
                ratios[level],
                ref[k][(level, fine)] / ref[k][(level, coarse)],
                equal_nan=True,
            )
    # Closed: the blocks keep nothing from later forwards.
    with torch.no_grad():
        neck(feats)
    assert all(b.last_attention is None for b in neck.dyhead_blocks)


def test_ratios_accumulate_over_images():
    neck = random_neck()
    with AttentionRecorder(neck) as rec, torch.no_grad():
        for size in [(16, 16), (24, 20), (32, 40)]:
            neck(pyramid(1, 16, size, levels=3))
            rec.collect()
        # A forward is read once; collecting again without one is an error.
        with pytest.raises(RuntimeError, match='recorded nothing'):
            rec.collect()
    assert all(r.shape == (3,) for r in rec.scale_ratios(3).values())
    with pytest.raises(KeyError, match='recorded'):
        rec.scale_ratios(4)


def test_block_features_are_the_neck_input_and_each_block_output():
    neck = random_neck()
    feats = pyramid(1, 16, (20, 28), levels=3)
    with AttentionRecorder(neck) as rec, torch.no_grad():
        neck(feats)
        rec.collect()
        expected = feats
        assert all(torch.equal(a, b) for a, b in zip(rec.stages[0], feats))
        for k, block in enumerate(neck.dyhead_blocks, start=1):
            expected = block(expected)
            assert all(
                torch.equal(a, b) for a, b in zip(rec.stages[k], expected)
            )
    assert sorted(rec.stages) == [0, 1, 2, 3]


def test_one_block_can_be_recorded_alone():
    neck = random_neck()
    feats = pyramid(1, 16, (16, 16), levels=3)
    block = neck.dyhead_blocks[1]
    with AttentionRecorder(block) as rec, torch.no_grad():
        _, attentions = neck.forward_with_attention(feats)
        neck(feats)
        rec.collect()
    assert sorted(rec.stages) == [0, 1]
    assert all(
        torch.equal(a, b) for a, b in zip(rec.stages[0], attentions[1].inputs)
    )
    assert all(
        torch.equal(a, b) for a, b in zip(rec.stages[1], attentions[1].outputs)
    )
    assert sorted(rec.scale_weights) == [1]


def test_unknown_layer_lists_the_available_ones():
    model = torch.nn.Module()
    model.neck = torch.nn.Sequential(torch.nn.Identity(), random_neck())
    name, layer = resolve_layer(model)
    assert name == 'neck.1' and isinstance(layer, DyHeadNeck)
    assert (
        resolve_layer(model, 'neck.1.dyhead_blocks.2')[1]
        is layer.dyhead_blocks[2]
    )
    with pytest.raises(ValueError) as err:
        resolve_layer(model, 'neck.2')
    msg = str(err.value)
    assert "layer='neck.2' does not exist" in msg
    assert "'neck.1'" in msg and "'neck.1.dyhead_blocks.2'" in msg
    with pytest.raises(ValueError, match='no DyHeadNeck'):
        resolve_layer(torch.nn.Linear(2, 2))


TOOL_CONFIG = """
_base_ = {base!r}
model = dict(
    backbone=dict(depth=18, base_channels=8, out_indices=(1, 2, 3),
                  frozen_stages=-1, norm_eval=False, init_cfg=None),
    neck=[
        dict(type='FPN', in_channels=[16, 32, 64], out_channels=32,
             start_level=0, add_extra_convs='on_output', num_outs=5),
        dict(type='DyHeadNeck', in_channels=32, out_channels=32, num_blocks=4,
             num_levels=5,
             norm_cfg=dict(type='GN', num_groups=8, requires_grad=True)),
    ],
    bbox_head=dict(num_classes=6, in_channels=32, feat_channels=32))
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(96, 96), keep_ratio=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                    'scale_factor')),
]
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
"""


@pytest.mark.slow
def test_cli_writes_figures_and_rejects_unknown_layers(tmp_path, capsys):
    from mmdet.apis import init_detector

    from mmdet_dyhead.cli import visualize_attention as tool
    from projects.synthetic_coco import generate_synthetic_coco

    data = generate_synthetic_coco(
        str(tmp_path / 'data'), num_train=1, num_val=4, image_size=(80, 96)
    )
    config = tmp_path / 'vis_cfg.py'
    config.write_text(
        TOOL_CONFIG.format(
            base=osp.join(
                REPO_ROOT, 'configs/atss/atss_r50_fpn_dyhead-6b_1x_coco.py'
            )
        )
    )
    model = init_detector(str(config), device='cpu')
    ckpt = tmp_path / 'vis.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, ckpt)
    val_dir = data['val_img_dir']
    first = osp.join(val_dir, sorted(os.listdir(val_dir))[0])
    out_dir = tmp_path / 'vis'
    # The tool's main() in this process: no interpreter start-up per call.
    common = [
        str(config),
        str(ckpt),
        '--images',
        first,
        '--out-dir',
        str(out_dir),
    ]

    assert tool.main(common + ['--ratio-images', val_dir]) == 0
    import matplotlib.image as mpimg

    for png in [
        'features_' + osp.splitext(osp.basename(first))[0] + '.png',
        'scale_ratios_block2.png',
        'scale_ratios_block4.png',
    ]:
        img = mpimg.imread(out_dir / png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0.01, png
    summary = json.loads((out_dir / 'scale_ratios.json').read_text())
    assert summary['layer'] == 'neck.1' and len(summary['images']) == 4
    assert sorted(summary['blocks']) == ['2', '4']
    assert all(len(r) == 4 for r in summary['blocks']['4'].values())
    assert sorted(summary['blocks']['4']) == ['0', '1', '2', '3', '4']

    capsys.readouterr()
    assert tool.main(common + ['--layer', 'neck.0']) == 2
    err = capsys.readouterr().err
    assert "'neck.0' does not exist" in err
    assert 'neck.1.dyhead_blocks.3' in err
    assert tool.main(common + ['--blocks', '5']) == 2
    assert '1..4' in capsys.readouterr().err
