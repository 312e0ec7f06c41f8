"""ONNX export of a tiny ATSS + DyHead detector, checked with onnxruntime."""

import os
import os.path as osp

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')

from mmdet_dyhead.deploy import (
    NativeBackendError,
    build_detector,  # noqa: E402
    export_onnx,
    load_images,
    match_detections,
    use_native_dcn,
    verify_onnx,
)

BASE_CONFIG = osp.join(
    REPO_ROOT, 'configs/atss/atss_r50_fpn_dyhead-6b_1x_coco.py'
)

# ResNet-18 at 1/8 width, 32-channel FPN and DyHead, 2 blocks, 128 px input.
TINY_CONFIG = f"""
_base_ = {BASE_CONFIG!r}
model = dict(
    backbone=dict(depth=18, base_channels=8, out_indices=(1, 2, 3),
                  frozen_stages=-1, norm_eval=False, init_cfg=None),
    neck=[
        dict(type='FPN', in_channels=[16, 32, 64], out_channels=32,
             start_level=0, add_extra_convs='on_output', num_outs=5),
        dict(type='DyHeadNeck', in_channels=32, out_channels=32, num_blocks=2,
             num_levels=5, dcn_backend={{backend!r}}, zero_init_offset=False,
             norm_cfg=dict(type='GN', num_groups=8, requires_grad=True)),
    ],
    bbox_head=dict(num_classes=3, in_channels=32, feat_channels=32))
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                    'scale_factor')),
]
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
"""


def write_config(folder, backend='auto'):
    path = osp.join(folder, f'tiny_atss_dyhead_{backend}.py')
    with open(path, 'w') as f:
        f.write(TINY_CONFIG.replace('{backend!r}', repr(backend)))
    return path


def write_image(path, h, w, seed):
    import cv2

    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 60).astype(np.uint8)
    for _ in range(4):  # a few bright rectangles, so the features vary
        y, x = rng.integers(0, h - 16), rng.integers(0, w - 16)
        img[
            y : y + rng.integers(8, h // 2), x : x + rng.integers(8, w // 2)
        ] = rng.integers(100, 255, 3)
    cv2.imwrite(path, img)
    return path


def write_checkpoint(config, path):
    """Random weights with visible DCN offsets and confident scores.

    The mmdet init gives offsets near zero (deformation untested) and class
    scores of ~0.01 (below score_thr, so no detection to compare); push
    both into a range where they matter.
    """
    model = build_detector(config, native_dcn=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'offset_conv' in name:
                p.normal_(0, 0.2)
        model.bbox_head.atss_cls.bias.zero_()
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)
    return path


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('onnx'))
    config = write_config(d)
    return dict(
        dir=d,
        config=config,
        checkpoint=write_checkpoint(config, osp.join(d, 'tiny.pth')),
        images=[
            write_image(osp.join(d, 'a.png'), 96, 128, 0),
            write_image(osp.join(d, 'b.png'), 128, 80, 1),
        ],
    )


def test_dynamic_export_matches_pytorch_and_mmdet_predict(assets):
    model = build_detector(
        assets['config'], assets['checkpoint'], native_dcn=True
    )
    onnx_file = osp.join(assets['dir'], 'dynamic.onnx')
    trace_inputs, _ = load_images(model, assets['images'][:1])
    export_onnx(model, trace_inputs, onnx_file, dynamic=True)

    import onnx

    graph = onnx.load(onnx_file).graph
    domains = {n.domain for n in graph.node}
    assert domains <= {'', 'ai.onnx'}, f'custom op domains in graph: {domains}'
    assert any(n.op_type == 'GridSample' for n in graph.node)

    # The second image has another size and aspect: the same file must serve
    # it.
    for image in assets['images']:
        inputs, samples = load_images(model, [image])
        report = verify_onnx(
            model, onnx_file, inputs, samples, box_tol=0.5, score_tol=1e-4
        )
        assert report['max_raw_rel_diff'] < 1e-4, report
        (r,) = report['images']
        assert r['count_ref'] > 10, 'too few detections for a meaningful check'
        assert r['ok'], r
        # decode_raw_outputs must be what mmdet's predict() gives.
        with torch.no_grad():
            (pred,) = model.predict(inputs, samples, rescale=True)
        ours = report['torch_dets'][0]
        assert torch.equal(pred.pred_instances.labels, ours.labels)
        assert torch.allclose(pred.pred_instances.bboxes, ours.bboxes)
        assert torch.allclose(pred.pred_instances.scores, ours.scores)


def test_match_detections_flags_shifted_boxes_and_missing_detections(assets):
    from mmengine.structures import InstanceData

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g) * 100
    ref = InstanceData(
        bboxes=torch.cat([xy, xy + 20], 1),
        scores=torch.rand(20, generator=g),
        labels=torch.randint(0, 3, (20,), generator=g),
    )
    same = match_detections(ref, ref, 0.5, 1e-4)
    assert same['ok'] and same['max_box_diff'] == 0
    shifted = InstanceData(
        bboxes=ref.bboxes + 0.6, scores=ref.scores, labels=ref.labels
    )
    assert not match_detections(ref, shifted, 0.5, 1e-4)['ok']
    rescored = InstanceData(
        bboxes=ref.bboxes, scores=ref.scores + 2e-4, labels=ref.labels
    )
    assert not match_detections(ref, rescored, 0.5, 1e-4)['ok']
    assert not match_detections(ref, ref[:19], 0.5, 1e-4)['ok']


def test_auto_backend_becomes_native_and_mmcv_is_refused(tmp_path):
    from mmengine.config import Config

    cfg = Config.fromfile(write_config(str(tmp_path), 'auto'))
    assert use_native_dcn(cfg.model) == ['model.neck.1']
    assert cfg.model.neck[1].dcn_backend == 'torch'

    cfg = Config.fromfile(write_config(str(tmp_path), 'mmcv'))
    with pytest.raises(NativeBackendError) as err:
        use_native_dcn(cfg.model)
    msg = str(err.value)
    assert "dcn_backend='mmcv'" in msg
    assert '--cfg-options model.neck.1.dcn_backend=torch' in msg

    cfg.model.neck[1] = dict(type='DyHead', in_channels=32, out_channels=32)
    with pytest.raises(NativeBackendError, match="type='DyHeadNeck'"):
        use_native_dcn(cfg.model)


def test_built_model_with_mmcv_dcn_is_refused(assets):
    from mmdet_dyhead.deploy import check_exportable_modules

    model = build_detector(assets['config'])
    check_exportable_modules(model)  # 'auto' traces the native path on CPU
    for m in model.modules():
        if type(m).__name__ == 'ModulatedDeformConv':
            m.backend = 'mmcv'
    with pytest.raises(NativeBackendError, match="dcn_backend='torch'"):
        check_exportable_modules(model)


def run_tool(*args):
    """tools/export_onnx.py's main() in this process (no interpreter
    start-up).
    """
    from mmdet_dyhead.cli.export_onnx import main

    return main(list(args))


@pytest.mark.slow
def test_cli_refuses_mmcv_backend_then_exports_with_the_suggested_override(
    assets, capsys
):
    config = write_config(assets['dir'], 'mmcv')
    out = osp.join(assets['dir'], 'cli', 'model.onnx')
    assert run_tool(config, assets['checkpoint'], '--out', out) == 2
    assert (
        '--cfg-options model.neck.1.dcn_backend=torch'
        in capsys.readouterr().err
    )
    assert not osp.exists(out)

    rc = run_tool(
        config,
        assets['checkpoint'],
        '--out',
        out,
        '--image',
        *assets['images'],
        '--static',
        '--cfg-options',
        'model.neck.1.dcn_backend=torch',
    )
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert stdout.count(': OK') == 2, stdout
    assert os.path.getsize(out) > 10_000
