"""ONNX export of a tiny ATSS + DyHead detector, checked with onnxruntime.

Both DCN forms: the standard ``DeformConv`` node (default at opset 19) and
the ``GridSample`` decomposition (``dcn_export='grid_sample'``).
"""

import os
import os.path as osp

import numpy as np
import pytest
import torch

from tests.helpers import REPO_ROOT

pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')

from mmdet.apis import init_detector  # noqa: E402
from mmengine.config import Config  # noqa: E402

from mmdet_dyhead.checkpoint import load_checkpoint  # noqa: E402
from mmdet_dyhead.deploy import (  # noqa: E402
    NativeBackendError,
    export_onnx,
    graph_op_counts,
    load_images,
    match_detections,
    onnx_dcn_export,
    resolve_dcn_export,
    use_native_dcn,
    verify_onnx,
)
from mmdet_dyhead.ops import (  # noqa: E402
    ModulatedDeformConv,
    mmcv_ops_available,
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


def build_native(config):
    """The detector of ``config`` with the native DCN, as export builds it."""
    cfg = Config.fromfile(config)
    use_native_dcn(cfg.model)
    return init_detector(cfg, device='cpu')


def write_checkpoint(config, path):
    """Random weights with visible DCN offsets and confident scores.

    The mmdet init gives offsets near zero (deformation untested) and class
    scores of ~0.01 (below score_thr, so no detection to compare); push
    both into a range where they matter.
    """
    model = build_native(config)
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


def dcn_nodes(onnx_file):
    """The DeformConv nodes of ``onnx_file`` with their attributes."""
    import onnx

    return [
        {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        for n in onnx.load(onnx_file).graph.node
        if n.op_type == 'DeformConv'
    ]


@pytest.fixture(scope='module')
def exported(assets, one_thread):
    """The tiny model and one dynamic-axes file per DCN form (opset 19)."""
    model = build_native(assets['config'])
    load_checkpoint(model, assets['checkpoint'])
    trace_inputs, _ = load_images(model, assets['images'][:1])
    files = {}
    for form in ('deform_conv', 'grid_sample'):
        files[form] = osp.join(assets['dir'], f'dynamic_{form}.onnx')
        export_onnx(
            model,
            trace_inputs,
            files[form],
            opset=19,
            dynamic=True,
            dcn_export=None if form == 'deform_conv' else form,
        )
    return model, files


def test_opset19_graph_has_one_deform_conv_per_dcn_and_no_grid_sample(
    exported,
):
    model, files = exported
    ops = graph_op_counts(files['deform_conv'])
    assert not {'GridSample', 'MatMul'} & set(ops), ops
    # Per block: mid branch on every level, low (stride 2) and high branch
    # on all levels but one (the finest has no finer, the coarsest no
    # coarser neighbour).
    neck = model.neck[1]
    blocks, levels = neck.num_blocks, neck.num_levels
    assert (blocks, levels) == (2, 5)
    nodes = dcn_nodes(files['deform_conv'])
    assert ops['DeformConv'] == len(nodes) == blocks * (3 * levels - 2)
    strides = [tuple(n['strides']) for n in nodes]
    assert strides.count((2, 2)) == blocks * (levels - 1)
    assert strides.count((1, 1)) == blocks * (2 * levels - 1)
    for n in nodes:
        assert n['kernel_shape'] == [3, 3] and n['pads'] == [1, 1, 1, 1]
        assert n['dilations'] == [1, 1]
        assert n['group'] == 1 and n['offset_group'] == 1

    import onnx

    graph = onnx.load(files['deform_conv']).graph
    domains = {n.domain for n in graph.node}
    assert domains <= {'', 'ai.onnx'}, f'custom op domains in graph: {domains}'
    old = graph_op_counts(files['grid_sample'])
    assert ops['total'] * 2 < old['total'], (ops['total'], old['total'])


def test_deform_conv_export_matches_pytorch_and_mmdet_predict(
    assets, exported
):
    model, files = exported
    # The second image has another size and aspect: the same file must serve
    # it.
    for image in assets['images']:
        inputs, samples = load_images(model, [image])
        report = verify_onnx(
            model,
            files['deform_conv'],
            inputs,
            samples,
            box_tol=0.5,
            score_tol=1e-4,
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


def test_grid_sample_form_is_the_decomposition_and_matches_pytorch(
    assets, exported
):
    model, files = exported
    ops = graph_op_counts(files['grid_sample'])
    assert 'DeformConv' not in ops
    assert ops['GridSample'] == 26, ops  # one per DCN, as DeformConv above
    inputs, samples = load_images(model, assets['images'][1:])
    report = verify_onnx(model, files['grid_sample'], inputs, samples)
    assert report['max_raw_rel_diff'] < 1e-4, report
    assert report['ok'], report['images']


def test_dcn_form_defaults_and_opset_errors():
    assert resolve_dcn_export(None, 19) == 'deform_conv'
    assert resolve_dcn_export(None, 20) == 'deform_conv'
    assert resolve_dcn_export(None, 17) == 'grid_sample'
    assert resolve_dcn_export('grid_sample', 16) == 'grid_sample'
    with pytest.raises(ValueError, match='opset >= 19'):
        resolve_dcn_export('deform_conv', 17)
    with pytest.raises(ValueError, match='no GridSample'):
        resolve_dcn_export(None, 15)
    with pytest.raises(ValueError, match='does not exist'):
        onnx_dcn_export('mmcv').__enter__()


class _OneDCN(torch.nn.Module):
    def __init__(self, stride, bias):
        super().__init__()
        self.dcn = ModulatedDeformConv(
            8, 6, 3, stride=stride, padding=1, bias=bias, backend='torch'
        )

    def forward(self, x, offset, mask):
        return self.dcn(x, offset, mask)


@pytest.mark.skipif(not mmcv_ops_available(), reason='mmcv built without ops')
@pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning')
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('bias', [True, False])
def test_deform_conv_node_matches_mmcv_kernel(tmp_path, stride, bias):
    """One exported layer in onnxruntime against mmcv's compiled kernel (an
    implementation independent of ours), on two input sizes."""
    from mmcv.ops import modulated_deform_conv2d as mmcv_dcn

    layer = _OneDCN(stride, bias).eval()
    if bias:
        torch.nn.init.normal_(layer.dcn.bias)

    def inputs(h, w):
        ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
        # Shifts of up to 3 px, some leaving the map, never integer.
        offset = (torch.rand(2, 18, ho, wo) - 0.5) * 6 + 0.013
        return torch.randn(2, 8, h, w), offset, torch.rand(2, 9, ho, wo)

    path = str(tmp_path / 'dcn.onnx')
    axes = {'batch': 0, 'h': 2, 'w': 3}
    with onnx_dcn_export('deform_conv'):
        torch.onnx.export(
            layer,
            inputs(11, 13),
            path,
            input_names=['input', 'offset', 'mask'],
            output_names=['out'],
            opset_version=19,
            dynamic_axes={
                k: {i: f'{k}_{a}' for a, i in axes.items()}
                for k in ('input', 'offset', 'mask', 'out')
            },
            dynamo=False,
        )
    ops = graph_op_counts(path)
    # Without a bias the graph also holds its zero constant.
    assert ops['DeformConv'] == 1 and ops['total'] == 2 - bias, ops
    (attrs,) = dcn_nodes(path)
    assert attrs['strides'] == [stride, stride]
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    for h, w in ((11, 13), (20, 9)):
        x, offset, mask = inputs(h, w)
        (out,) = session.run(
            None,
            {
                'input': x.numpy(),
                'offset': offset.numpy(),
                'mask': mask.numpy(),
            },
        )
        with torch.no_grad():
            ref = mmcv_dcn(
                x, offset, mask, layer.dcn.weight, layer.dcn.bias,
                stride, 1, 1, 1, 1,
            )  # fmt: skip
        assert out.shape == tuple(ref.shape)
        assert np.abs(out - ref.numpy()).max() < 1e-5 * ref.abs().max()


@pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning')
def test_form_choice_is_scoped_to_the_export_call(tmp_path):
    """Inside onnx_dcn_export the operator becomes the chosen form; outside
    it (also after a block that raised) torch's exporter meets the
    operator itself and refuses it by name."""
    layer = _OneDCN(1, False).eval()
    args = (
        torch.randn(1, 8, 6, 7),
        torch.rand(1, 18, 6, 7),
        torch.rand(1, 9, 6, 7),
    )
    path = str(tmp_path / 'grid.onnx')
    with onnx_dcn_export('grid_sample'):
        torch.onnx.export(layer, args, path, opset_version=19, dynamo=False)
    ops = graph_op_counts(path)
    assert 'GridSample' in ops and 'DeformConv' not in ops
    with pytest.raises(RuntimeError):
        with onnx_dcn_export('deform_conv'):
            raise RuntimeError('export failed')
    with pytest.raises(
        torch.onnx.errors.UnsupportedOperatorError,
        match='mmdet_dyhead::modulated_deform_conv2d',
    ):
        torch.onnx.export(
            layer,
            args,
            str(tmp_path / 'plain.onnx'),
            opset_version=19,
            dynamo=False,
        )


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

    model = init_detector(assets['config'], device='cpu')
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


def test_runtime_without_deform_conv_kernel_gets_a_way_out(
    exported, monkeypatch
):
    import onnxruntime as ort

    from mmdet_dyhead.deploy import onnxruntime_session

    def old_runtime(*args, **kwargs):
        # What onnxruntime < 1.25 raises for the node.
        raise Exception(
            '[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an '
            "implementation for DeformConv(19) node with name '/DeformConv'"
        )

    monkeypatch.setattr(ort, 'InferenceSession', old_runtime)
    with pytest.raises(RuntimeError, match='--dcn-export grid_sample'):
        onnxruntime_session(exported[1]['deform_conv'])


def test_cli_refuses_deform_conv_below_opset_19(assets, capsys):
    out = osp.join(assets['dir'], 'cli17', 'model.onnx')
    args = (assets['config'], assets['checkpoint'], '--out', out)
    assert run_tool(*args, '--opset', '17', '--dcn-export', 'deform_conv') == 2
    err = capsys.readouterr().err
    assert 'needs ONNX opset >= 19' in err and 'grid_sample' in err
    assert not osp.exists(out)


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
