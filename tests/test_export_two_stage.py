"""Faster and Cascade R-CNN (baseline, DyHead neck, Fig. 2c) end to end in
ONNX.

References are mmdet's and mmcv's own: ``model.predict`` (RPN, mmcv's
RoIAlign, box head, ``multiclass_nms``) on the same preprocessed batch for
the graph in PyTorch and in onnxruntime, mmcv's ``roi_align`` for ONNX
``RoiAlign``, and the runner (torch-free, onnxruntime and OpenVINO)
against ``predict`` on the original images.
"""

import importlib.util
import json
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.helpers import REPO_ROOT
from tests.torch_free import torch_free_env

pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')

from mmdet.apis import init_detector  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

from mmdet_dyhead.cli import export_onnx as export_tool  # noqa: E402
from mmdet_dyhead.deploy import (  # noqa: E402
    TwoStageWithPostprocess,
    graph_op_counts,
    img_shapes,
    load_images,
    match_detections,
    use_native_dcn,
    verify_end_to_end,
)
from projects.synthetic_coco.tiny_configs import (  # noqa: E402
    TEST_META_KEYS,
    shrink_model,
)
from tests.test_deploy_e2e import write_image  # noqa: E402

CONFIGS = {
    'baseline': 'configs/faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
    'dyhead': 'configs/faster_rcnn/faster-rcnn_r50_fpn_dyhead-6b_1x_coco.py',
    'fig2c': 'configs/faster_rcnn/faster-rcnn_r50_fpn_dyhead-6b-scale-'
    'spatial_task-attn-roi-head_1x_coco.py',
    'cascade_baseline': 'configs/cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py',
    'cascade_dyhead': 'configs/cascade_rcnn/cascade-rcnn_r50_fpn_dyhead-'
    '6b_1x_coco.py',
    'cascade_fig2c': 'configs/cascade_rcnn/cascade-rcnn_r50_fpn_dyhead-6b-'
    'scale-spatial_task-attn-roi-head_1x_coco.py',
}


def tiny_cfg(name):
    """The shipped config, shrunk (2 DyHead blocks), 128 px test images,
    RoI levels for small RoIs."""
    cfg = Config.fromfile(osp.join(REPO_ROOT, CONFIGS[name]))
    shrink_model(cfg.model)
    if isinstance(cfg.model.neck, list):
        cfg.model.neck[1].num_blocks = 2
        cfg.model.neck[1].zero_init_offset = False
    cfg.model.test_cfg.rcnn.score_thr = 0.05
    # RoIs of 128 px images on all four levels (56 would put nearly all
    # on P2).
    cfg.model.roi_head.bbox_roi_extractor.finest_scale = 8
    cfg.test_dataloader.dataset.pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(128, 128), keep_ratio=True),
        dict(type='PackDetInputs', meta_keys=TEST_META_KEYS),
    ]
    heads = cfg.model.roi_head.bbox_head
    num = (heads[-1] if isinstance(heads, list) else heads).num_classes
    cfg.test_dataloader.dataset.metainfo = dict(
        classes=tuple(f'c{i}' for i in range(num))
    )
    return cfg


def tiny_model(cfg, seed=0):
    """Random weights that give many proposals (RPN bias 0), spread class
    scores, visible box deltas and visibly deformed DCN sampling.

    The weights depend on ``seed`` only, not on the global RNG state the
    caller happens to leave (a module-scoped fixture is built after
    whichever test ran before it)."""
    use_native_dcn(cfg.model)
    torch.manual_seed(seed)
    model = init_detector(cfg, device='cpu')
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'offset_conv' in name:
                p.normal_(0, 0.2)
        model.rpn_head.rpn_cls.bias.zero_()
        heads = model.roi_head.bbox_head
        # Cascade R-CNN: one head per stage.
        for head in (
            heads if isinstance(heads, torch.nn.ModuleList) else [heads]
        ):
            head.fc_cls.weight.normal_(0, 0.2)
            head.fc_reg.weight.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp('two_stage_images')
    return [
        write_image(str(d / 'a.png'), 96, 128, 0),
        write_image(str(d / 'b.png'), 150, 70, 1),
        write_image(str(d / 'c.jpg'), 61, 93, 2),
    ]


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_graph_in_torch_equals_mmdet_predict(name, images, one_thread):
    """The graph's forward, run in PyTorch, is mmdet's predict: same boxes,
    scores, labels and order, for a padded batch of two sizes."""
    model = tiny_model(tiny_cfg(name))
    inputs, samples = load_images(model, images[:2])
    with torch.no_grad():
        dets, labels = TwoStageWithPostprocess(model)(
            inputs, img_shapes(samples)
        )
        ref = model.predict(inputs, samples, rescale=False)
    k = model.roi_head.test_cfg.max_per_img
    assert dets.shape == (2, k, 5) and labels.shape == (2, k)
    for i, r in enumerate(ref):
        r = r.pred_instances
        n = len(r.scores)
        assert 10 < n, 'too few detections for a meaningful check'
        torch.testing.assert_close(dets[i, :n, :4], r.bboxes)
        torch.testing.assert_close(dets[i, :n, 4], r.scores)
        assert torch.equal(labels[i, :n], r.labels)
        assert (labels[i, n:] == -1).all() and (dets[i, n:] == 0).all()


@pytest.mark.parametrize('sampling_ratio', [0, 2])
def test_onnx_roi_align_half_pixel_is_mmcv_aligned(sampling_ratio):
    """What the graph relies on: ONNX RoiAlign (opset 16, half_pixel, avg)
    in onnxruntime equals mmcv's RoIAlign(aligned=True), also for the
    adaptive sampling_ratio=0, empty, sub-pixel and out-of-image boxes."""
    import onnxruntime as ort
    from mmcv.ops import roi_align
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    feat = rng.standard_normal((2, 3, 20, 24)).astype(np.float32)
    xy = rng.uniform(-20, 120, (200, 2))
    wh = rng.exponential(30, (200, 2))
    wh[:10] = 0
    wh[10:20] = rng.uniform(0, 1, (10, 2))
    rois = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    batch = rng.integers(0, 2, 200)
    node = helper.make_node(
        'RoiAlign',
        ['x', 'rois', 'batch'],
        ['y'],
        coordinate_transformation_mode='half_pixel',
        mode='avg',
        output_height=7,
        output_width=7,
        sampling_ratio=sampling_ratio,
        spatial_scale=0.25,
    )
    graph = helper.make_graph(
        [node],
        'roi_align',
        [
            helper.make_tensor_value_info('x', TensorProto.FLOAT, None),
            helper.make_tensor_value_info('rois', TensorProto.FLOAT, None),
            helper.make_tensor_value_info('batch', TensorProto.INT64, None),
        ],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, None)],
    )
    onnx_model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid('', 16)]
    )
    (got,) = ort.InferenceSession(
        onnx_model.SerializeToString(), providers=['CPUExecutionProvider']
    ).run(None, {'x': feat, 'rois': rois, 'batch': batch})
    boxes = np.concatenate([batch[:, None], rois], 1).astype(np.float32)
    want = roi_align(
        torch.from_numpy(feat),
        torch.from_numpy(boxes),
        (7, 7),
        0.25,
        sampling_ratio,
        'avg',
        True,
    ).numpy()
    assert np.abs(want).max() > 1
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def _write_assets(name, folder, seed=0):
    cfg = tiny_cfg(name)
    model = tiny_model(cfg, seed)
    config = osp.join(folder, f'{name}.py')
    cfg.dump(config)
    checkpoint = osp.join(folder, f'{name}.pth')
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, checkpoint)
    return model, config, checkpoint


# Weights of the module's exported Fig. 2c detector (see fig2c_file).
FIG2C_SEED = 1


def test_tiny_model_ignores_the_global_rng_state():
    """A module-scoped fixture's model must not depend on the test that ran
    before it: the weights come from tiny_model's seed alone."""
    cfg = tiny_cfg('fig2c')
    states = []
    for ambient in (0, 123):
        torch.manual_seed(ambient)
        states.append(tiny_model(cfg, seed=FIG2C_SEED).state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


@pytest.fixture(scope='module')
def fig2c_file(tmp_path_factory, images):
    """The Fig. 2c detector through tools/export_onnx.py --postprocess,
    checked against PyTorch by the tool on two images."""
    d = str(tmp_path_factory.mktemp('two_stage'))
    # Not seed 0: its weights put a pair of b.png's class-3 boxes at IoU
    # 0.5000003 against the 0.5 NMS threshold, a tie that float rounding
    # (the C++ DCN kernel vs onnxruntime's DeformConv, 1e-7 apart) decides
    # either way.
    model, config, checkpoint = _write_assets('fig2c', d, seed=FIG2C_SEED)
    out = osp.join(d, 'fig2c.onnx')
    code = export_tool.main(
        [config, checkpoint, '--out', out, '--postprocess', '--image']
        + images[:2]
    )
    return model, out, code


def test_export_tool_writes_and_verifies_faster_rcnn(fig2c_file, capsys):
    import onnx

    model, path, code = fig2c_file
    assert code == 0
    ops = graph_op_counts(path)
    # RPN NMS and per-class NMS; one RoiAlign per RoI level (P2-P5).
    assert ops['NonMaxSuppression'] == 2
    assert ops['RoiAlign'] == 4
    onnx_model = onnx.load(path)
    assert {n.domain for n in onnx_model.graph.node} <= {'', 'ai.onnx'}
    props = {p.key: p.value for p in onnx_model.metadata_props}
    post = json.loads(props['mmdet_dyhead.postprocess'])
    rcnn, rpn = model.cfg.model.test_cfg.rcnn, model.cfg.model.test_cfg.rpn
    assert post['score_thr'] == rcnn.score_thr == 0.05
    assert post['iou_threshold'] == rcnn.nms.iou_threshold
    assert post['max_per_img'] == rcnn.max_per_img
    assert post['rpn']['nms_pre'] == rpn.nms_pre
    assert post['rpn']['iou_threshold'] == rpn.nms.iou_threshold
    assert post['rpn']['max_per_img'] == rpn.max_per_img
    roi = model.cfg.model.roi_head.bbox_roi_extractor
    (stage,) = post['roi']
    assert stage['sampling_ratio'] == roi.roi_layer.sampling_ratio
    assert stage['finest_scale'] == roi.finest_scale == 8
    assert stage['spatial_scales'] == [1 / s for s in roi.featmap_strides]
    assert json.loads(props['mmdet_dyhead.classes']) == list(
        model.cfg.test_dataloader.dataset.metainfo['classes']
    )


def test_exported_faster_rcnn_other_sizes(fig2c_file, images):
    """The dynamic file on a size it was not traced with, alone."""
    model, path, _ = fig2c_file
    inputs, samples = load_images(model, images[2:])
    report = verify_end_to_end(model, path, inputs, samples)
    assert report['images'][0]['count_ref'] > 10
    assert report['ok'], report['images']


def test_runner_without_torch_runs_faster_rcnn(fig2c_file, images, tmp_path):
    """``python -m mmdet_dyhead_runtime`` where torch cannot be imported,
    with onnxruntime and (if installed) OpenVINO: mmdet's predict on the
    original images."""
    model, path, _ = fig2c_file
    env = torch_free_env(tmp_path, REPO_ROOT)
    backends = ['onnxruntime']
    if importlib.util.find_spec('openvino'):
        backends.append('openvino')
    for backend in backends:
        out = str(tmp_path / f'{backend}.json')
        proc = subprocess.run(
            [sys.executable, '-m', 'mmdet_dyhead_runtime', path, *images]
            + ['--backend', backend, '--threads', '1', '--out-json', out],
            env=env,
            cwd=str(tmp_path),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        with open(out) as f:
            records = json.load(f)
        for image, rec in zip(images, records):
            inputs, samples = load_images(model, [image])
            with torch.no_grad():
                (ref,) = model.predict(inputs, samples, rescale=True)
            got = InstanceData(
                bboxes=torch.tensor(rec['bboxes']).view(-1, 4),
                scores=torch.tensor(rec['scores']),
                labels=torch.tensor(rec['labels']),
            )
            # The JSON rounds boxes to 1e-3 px and scores to 1e-5.
            r = match_detections(ref.pred_instances, got, 2e-3, 2e-5)
            assert r['count_ref'] > 10 and r['ok'], (backend, image, r)


@pytest.mark.slow
@pytest.mark.parametrize(
    'name', ['baseline', 'dyhead', 'cascade_dyhead', 'cascade_fig2c']
)
def test_export_tool_other_faster_and_cascade_rcnn(name, images, tmp_path):
    """mmdet's Shared2FCBBoxHead behind FPN, and behind FPN + DyHead;
    Cascade R-CNN's three stages (RoIs refined, logits averaged) with
    either box head."""
    _, config, checkpoint = _write_assets(name, str(tmp_path))
    out = str(tmp_path / f'{name}.onnx')
    code = export_tool.main(
        [config, checkpoint, '--out', out, '--postprocess', '--image']
        + images[:2]
    )
    assert code == 0
    stages = 3 if name.startswith('cascade') else 1
    assert graph_op_counts(out)['RoiAlign'] == 4 * stages


def test_mask_rcnn_is_refused(tmp_path, capsys):
    """Refused before the checkpoint is read (none exists here), naming
    what runs it instead; Faster R-CNN without --postprocess too."""
    out = str(tmp_path / 'x.onnx')
    missing = str(tmp_path / 'missing.pth')
    path = osp.join(
        REPO_ROOT, 'configs/mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
    )
    reason = 'a mask head'
    assert (
        export_tool.main([path, missing, '--out', out, '--postprocess']) == 2
    )
    err = capsys.readouterr().err
    assert reason in err and 'tools/image_demo.py' in err, err
    faster = osp.join(REPO_ROOT, CONFIGS['baseline'])
    assert export_tool.main([faster, missing, '--out', out]) == 2
    assert '--postprocess' in capsys.readouterr().err
    assert not osp.exists(out)
