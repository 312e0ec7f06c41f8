"""End-to-end ONNX (detections in the graph) and the torch-free runner.

References are mmdet's own: ``model.predict`` (its ``predict_by_feat``
and mmcv's NMS) on the same preprocessed batch, and mmdet's test pipeline
(``load_images``) for the runner's preprocessing.
"""

import importlib.util
import json
import os
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

from mmdet_dyhead.deploy import (  # noqa: E402
    DetectorWithPostprocess,
    PostprocessError,
    export_onnx,
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

RUNTIME = osp.join(REPO_ROOT, 'mmdet_dyhead', 'deploy', 'runtime.py')
FAMILIES = {
    'atss': ('configs/atss/atss_r50_fpn_dyhead-6b_1x_coco.py', 'atss_cls'),
    'fcos': (
        'configs/fcos/fcos_r50-caffe_fpn_dyhead-6b-center-normbbox-'
        'centeronreg-giou_1x_coco.py',
        'conv_cls',
    ),
    'retinanet': (
        'configs/retinanet/retinanet_r50_fpn_dyhead-6b_1x_coco.py',
        'retina_cls',
    ),
}


def tiny_model(family, num_blocks=2, score_thr=0.3):
    """``family``'s shipped DyHead config, shrunk, with random weights that
    give many detections (class bias 0: scores near 0.5, some above
    ``score_thr``, most below) and visibly deformed DCN sampling."""
    path, cls_conv = FAMILIES[family]
    cfg = Config.fromfile(osp.join(REPO_ROOT, path))
    shrink_model(cfg.model)
    cfg.model.neck[1].num_blocks = num_blocks
    cfg.model.neck[1].zero_init_offset = False
    cfg.model.test_cfg.score_thr = score_thr
    cfg.test_dataloader.dataset.pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(128, 128), keep_ratio=True),
        dict(type='PackDetInputs', meta_keys=TEST_META_KEYS),
    ]
    cfg.test_dataloader.dataset.metainfo = dict(
        classes=tuple(f'c{i}' for i in range(cfg.model.bbox_head.num_classes))
    )
    use_native_dcn(cfg.model)
    model = init_detector(cfg, device='cpu')
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'offset_conv' in name:
                p.normal_(0, 0.2)
        getattr(model.bbox_head, cls_conv).bias.zero_()
    return model.eval()


def write_image(path, h, w, seed):
    import cv2

    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 60).astype(np.uint8)
    for _ in range(5):  # bright rectangles, so that the features vary
        y, x = rng.integers(0, h - 16), rng.integers(0, w - 16)
        img[
            y : y + rng.integers(8, h // 2), x : x + rng.integers(8, w // 2)
        ] = rng.integers(100, 255, 3)
    cv2.imwrite(path, img)
    return path


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp('e2e_images')
    # Different sizes and aspects: one batch pads them to a common size.
    return [
        write_image(str(d / 'a.png'), 96, 128, 0),
        write_image(str(d / 'b.png'), 150, 70, 1),
        write_image(str(d / 'c.jpg'), 61, 93, 2),
    ]


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_torch_postprocess_equals_mmdet_predict(family, images, one_thread):
    """The graph's post-processing, run in PyTorch, is mmdet's: same boxes,
    scores, labels and order, for a padded batch of two sizes."""
    model = tiny_model(family)
    inputs, samples = load_images(model, images[:2])
    with torch.no_grad():
        dets, labels = DetectorWithPostprocess(model)(
            inputs, img_shapes(samples)
        )
        ref = model.predict(inputs, samples, rescale=False)
    k = model.bbox_head.test_cfg.max_per_img
    assert dets.shape == (2, k, 5) and labels.shape == (2, k)
    for i, r in enumerate(ref):
        r = r.pred_instances
        n = len(r.scores)
        assert 10 < n, 'too few detections for a meaningful check'
        torch.testing.assert_close(dets[i, :n, :4], r.bboxes)
        torch.testing.assert_close(dets[i, :n, 4], r.scores)
        assert torch.equal(labels[i, :n], r.labels)
        # Padding: zero rows, label -1.
        assert (labels[i, n:] == -1).all() and (dets[i, n:] == 0).all()


@pytest.fixture(scope='module')
def atss_file(tmp_path_factory, images):
    model = tiny_model('atss')
    inputs, samples = load_images(model, images[:1])
    path = str(tmp_path_factory.mktemp('e2e') / 'atss_e2e.onnx')
    export_onnx(
        model, inputs, path, postprocess=True, img_shape=img_shapes(samples)
    )
    return model, path


def test_end_to_end_graph_ops_metadata_and_shapes(atss_file):
    import onnx

    model, path = atss_file
    ops = graph_op_counts(path)
    assert ops['NonMaxSuppression'] == 1
    assert ops['TopK'] == 5 + 1  # nms_pre per level, max_per_img
    assert ops['DeformConv'] == 2 * 13
    onnx_model = onnx.load(path)
    assert {n.domain for n in onnx_model.graph.node} <= {'', 'ai.onnx'}
    props = {p.key: p.value for p in onnx_model.metadata_props}
    cfg = model.bbox_head.test_cfg
    post = json.loads(props['mmdet_dyhead.postprocess'])
    assert post['score_thr'] == cfg.score_thr == 0.3
    assert post['nms_pre'] == cfg.nms_pre
    assert post['iou_threshold'] == cfg.nms.iou_threshold
    assert post['max_per_img'] == cfg.max_per_img
    assert json.loads(props['mmdet_dyhead.classes']) == list(
        model.cfg.test_dataloader.dataset.metainfo['classes']
    )
    pre = json.loads(props['mmdet_dyhead.preprocess'])
    assert pre['resize'] == dict(
        scale=[128, 128], keep_ratio=True, interpolation='bilinear'
    )
    dp = model.cfg.model.data_preprocessor
    assert pre['mean'] == list(dp.mean) and pre['std'] == list(dp.std)
    assert pre['pad_size_divisor'] == dp.pad_size_divisor
    dims = {
        v.name: [
            d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim
        ]
        for v in list(onnx_model.graph.input) + list(onnx_model.graph.output)
    }
    assert dims == {
        'input': ['batch', 3, 'height', 'width'],
        'img_shape': ['batch', 2],
        'dets': ['batch', cfg.max_per_img, 5],
        'labels': ['batch', cfg.max_per_img],
    }


def test_end_to_end_onnx_equals_mmdet_predict(atss_file, images):
    """One dynamic file: a batch of two sizes, then a third size alone."""
    model, path = atss_file
    for batch in (images[:2], images[2:]):
        inputs, samples = load_images(model, batch)
        report = verify_end_to_end(model, path, inputs, samples)
        for r in report['images']:
            assert r['count_ref'] > 10, r
        assert report['ok'], report['images']


def test_runner_without_torch_equals_mmdet_predict(
    atss_file, images, tmp_path
):
    """By the path of its former module (mmdet_dyhead/deploy/runtime.py,
    which loads mmdet_dyhead_runtime from the checkout's root)."""
    model, path = atss_file
    env = torch_free_env(tmp_path)
    out = str(tmp_path / 'dets.json')
    show = str(tmp_path / 'vis')
    proc = subprocess.run(
        [sys.executable, RUNTIME, path, *images, '--out-json', out]
        + ['--show-dir', show],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    records = json.load(open(out))
    assert [r['image'] for r in records] == images
    assert len(proc.stdout.strip().splitlines()) == len(images)
    assert sorted(os.listdir(show)) == sorted(osp.basename(p) for p in images)
    classes = model.cfg.test_dataloader.dataset.metainfo['classes']
    # One image per run (the runner's default): padding to a common batch
    # size changes what the convolutions see near the border.
    for image, rec in zip(images, records):
        inputs, samples = load_images(model, [image])
        with torch.no_grad():
            (ref,) = model.predict(inputs, samples, rescale=True)
        ours = InstanceData(
            bboxes=torch.tensor(rec['bboxes']).view(-1, 4),
            scores=torch.tensor(rec['scores']),
            labels=torch.tensor(rec['labels']),
        )
        # The JSON rounds boxes to 1e-3 px and scores to 1e-5.
        r = match_detections(ref.pred_instances, ours, 2e-3, 2e-5)
        assert r['count_ref'] > 10 and r['ok'], r
        assert rec['names'] == [classes[i] for i in rec['labels']]


def test_runner_preprocessing_is_mmdets_test_pipeline(atss_file, images):
    """The runner's numpy/OpenCV preprocessing gives the batch mmdet's
    pipeline and data preprocessor give, bit for bit."""
    from mmdet_dyhead.deploy import runtime

    model, path = atss_file
    detector = runtime.OnnxDetector(path)
    arrays = [runtime.read_image(p) for p in images]
    batch, shapes, factors = runtime.preprocess(
        arrays, detector.preprocess_settings
    )
    inputs, samples = load_images(model, images)
    assert batch.shape == tuple(inputs.shape)
    np.testing.assert_array_equal(batch, inputs.numpy())
    np.testing.assert_array_equal(shapes, img_shapes(samples).numpy())
    for f, s in zip(factors, samples):
        assert f == tuple(s.metainfo['scale_factor'])


def test_runner_refuses_a_file_without_end_to_end_metadata(tmp_path, images):
    """A raw-map export has no detections to read: the runner says which
    export to make instead (a one-node graph stands in for it)."""
    import onnx
    from onnx import TensorProto, helper

    from mmdet_dyhead.deploy import runtime

    graph = helper.make_graph(
        [helper.make_node('Identity', ['input'], ['cls_score_0'])],
        'raw',
        [helper.make_tensor_value_info('input', TensorProto.FLOAT, None)],
        [
            helper.make_tensor_value_info(
                'cls_score_0', TensorProto.FLOAT, None
            )
        ],
    )
    raw = str(tmp_path / 'raw.onnx')
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid('', 19)]),
        raw,
    )
    assert runtime.main([raw, images[0]]) == 2
    with pytest.raises(ValueError, match='--postprocess'):
        runtime.OnnxDetector(raw)


def test_unsupported_nms_is_refused_with_the_way_out():
    model = tiny_model('atss', num_blocks=1)
    model.bbox_head.test_cfg.nms = dict(type='soft_nms', iou_threshold=0.5)
    with pytest.raises(PostprocessError, match='without --postprocess'):
        DetectorWithPostprocess(model)


@pytest.mark.slow
@pytest.mark.parametrize('family', ['fcos', 'retinanet'])
def test_fcos_and_retinanet_end_to_end_onnx(family, images, tmp_path):
    """Points and distance decoding (FCOS), nine anchors per location and no
    score factor (RetinaNet), in onnxruntime; the grid_sample form."""
    model = tiny_model(family, num_blocks=1)
    inputs, samples = load_images(model, images[:2])
    path = str(tmp_path / f'{family}.onnx')
    export_onnx(
        model,
        inputs,
        path,
        dcn_export='grid_sample',
        postprocess=True,
        img_shape=img_shapes(samples),
    )
    report = verify_end_to_end(model, path, inputs, samples)
    for r in report['images']:
        assert r['count_ref'] > 10, r
    assert report['ok'], report['images']


def test_runtimes_without_deform_conv_name_the_way_out(atss_file, monkeypatch):
    """onnxruntime < 1.25 and an OpenVINO without the conversion extension
    (no openvino.frontend) stop with a message naming --dcn-export
    grid_sample; the texts are those the runtimes print (OpenVINO 2026.4
    without the runner's extension, onnxruntime 1.24.4)."""
    import types

    import onnxruntime as ort

    from mmdet_dyhead.deploy import runtime

    _, path = atss_file

    def old_ort(*args, **kwargs):
        raise Exception(
            '[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an '
            "implementation for DeformConv(19) node with name '/DeformConv'"
        )

    with monkeypatch.context() as m:
        m.setattr(ort, 'InferenceSession', old_ort)
        with pytest.raises(RuntimeError, match='--dcn-export grid_sample'):
            runtime.OnnxDetector(path)

    class Core:
        def read_model(self, file):
            raise RuntimeError(
                "Model wasn't fully converted. -- No conversion rule found "
                'for operations: DeformConv-19'
            )

    fake = types.SimpleNamespace(Core=Core, __version__='2022.3.0')
    monkeypatch.setitem(sys.modules, 'openvino', fake)
    with pytest.raises(RuntimeError, match='--dcn-export grid_sample') as e:
        runtime.OnnxDetector(path, backend='openvino')
    assert 'Upgrade OpenVINO' in str(e.value)
    assert 'ConversionExtension' in str(e.value)


def test_openvino_runs_the_deform_conv_file_like_onnxruntime(
    atss_file, images
):
    """The DeformConv form through OpenVINO's DeformableConvolution (the
    runner's conversion extension): the detections onnxruntime gives, image
    by image (one static-shape model compiled per input size)."""
    pytest.importorskip('openvino')
    import mmdet_dyhead_runtime as rt

    _, path = atss_file
    ours = rt.OnnxDetector(path, num_threads=1, backend='openvino')
    ref = rt.OnnxDetector(path, num_threads=1)
    worst = dict(box=0.0, score=0.0)
    for image in images:
        (a,), (b,) = ref([image]), ours([image])
        r = match_detections(
            *(
                InstanceData(**{k: torch.from_numpy(v) for k, v in d.items()})
                for d in (a, b)
            ),
            1e-3,
            1e-5,
        )
        assert r['count_ref'] > 10 and r['ok'], r
        worst['box'] = max(worst['box'], r['max_box_diff'])
        worst['score'] = max(worst['score'], r['max_score_diff'])
    # One static-shape model per padded input size.
    sizes = {
        rt.preprocess([rt.read_image(i)], ours.preprocess_settings)[0].shape
        for i in images
    }
    assert len(ours.session.compiled) == len(sizes) > 1
    print('OpenVINO vs onnxruntime, DeformConv form:', worst)


def test_runner_as_a_module_without_torch(atss_file, images, tmp_path):
    """``python -m mmdet_dyhead_runtime`` (what ``dyhead-run-onnx`` runs;
    tests/test_package.py runs the installed command) where torch, mmdet
    and mmdet_dyhead fail to import: the detections of the runner in this
    process, with onnxruntime and with OpenVINO."""
    import mmdet_dyhead_runtime as rt

    _, path = atss_file
    env = torch_free_env(tmp_path, REPO_ROOT)
    backends = ['onnxruntime']
    if importlib.util.find_spec('openvino'):
        backends.append('openvino')
    ref = rt.OnnxDetector(path)
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
        assert [r['image'] for r in records] == images
        for image, rec in zip(images, records):
            (want,) = ref([image])
            got = InstanceData(
                bboxes=torch.tensor(rec['bboxes']).view(-1, 4),
                scores=torch.tensor(rec['scores']),
                labels=torch.tensor(rec['labels']),
            )
            want = InstanceData(
                **{k: torch.from_numpy(v) for k, v in want.items()}
            )
            # The JSON rounds boxes to 1e-3 px and scores to 1e-5.
            r = match_detections(want, got, 2e-3, 2e-5)
            assert r['count_ref'] > 10 and r['ok'], (backend, r)


_DROP = object()


def _preprocess(**changes):
    """A change of the file's ``mmdet_dyhead.preprocess`` entries."""

    def change(props):
        pre = json.loads(props['mmdet_dyhead.preprocess'])
        for key, value in changes.items():
            target, name = pre, key
            if key.startswith('resize.'):
                target, name = pre['resize'], key.split('.', 1)[1]
            if value is _DROP:
                del target[name]
            else:
                target[name] = value
        props['mmdet_dyhead.preprocess'] = json.dumps(pre)

    return change


def _drop(key):
    def change(props):
        del props[key]

    return change


def _replace(key, text):
    def change(props):
        props[key] = text

    return change


# (case, change of the metadata, the key the message must name, a word of
# the fix it must give)
BAD_METADATA = [
    (
        'negative_std',
        _preprocess(std=[-58.4, 57.1, 57.4]),
        'preprocess.std',
        'data_preprocessor.std',
    ),
    (
        'zero_std',
        _preprocess(std=[58.4, 0.0, 57.4]),
        'preprocess.std',
        'data_preprocessor.std',
    ),
    (
        'pad_divisor_0',
        _preprocess(pad_size_divisor=0),
        'preprocess.pad_size_divisor',
        'data_preprocessor.pad_size_divisor',
    ),
    (
        'pad_divisor_float',
        _preprocess(pad_size_divisor=2.5),
        'preprocess.pad_size_divisor',
        'data_preprocessor.pad_size_divisor',
    ),
    (
        'interpolation',
        _preprocess(**{'resize.interpolation': 'smooth'}),
        'interpolation',
        'bilinear',
    ),
    (
        'negative_scale',
        _preprocess(**{'resize.scale': [-128, 128]}),
        'resize.scale',
        'Resize scale',
    ),
    (
        'absurd_scale',
        _preprocess(**{'resize.scale': [100000, 80000]}),
        'resize.scale',
        'Resize scale',
    ),
    (
        'missing_mean',
        _preprocess(mean=_DROP),
        'preprocess.mean',
        'export_onnx.py',
    ),
    (
        'missing_keep_ratio',
        _preprocess(**{'resize.keep_ratio': _DROP}),
        'resize.keep_ratio',
        'export_onnx.py',
    ),
    (
        'missing_classes',
        _drop('mmdet_dyhead.classes'),
        'mmdet_dyhead.classes',
        'export_onnx.py',
    ),
    (
        'preprocess_not_json',
        _replace('mmdet_dyhead.preprocess', '{"resize":'),
        'mmdet_dyhead.preprocess',
        'export_onnx.py',
    ),
    (
        'postprocess_not_json',
        _replace('mmdet_dyhead.postprocess', 'nan nan'),
        'mmdet_dyhead.postprocess',
        'export_onnx.py',
    ),
]


def _bad_file(src, dst, case):
    import onnx

    if case == 'truncated':
        with open(src, 'rb') as f:
            data = f.read()
        with open(dst, 'wb') as f:
            f.write(data[: len(data) // 2])
        return dst
    if case == 'missing':
        return dst
    (change,) = [c for name, c, _, _ in BAD_METADATA if name == case]
    model = onnx.load(src)
    props = {p.key: p.value for p in model.metadata_props}
    change(props)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.save(model, dst)
    return dst


RUNNER_BACKENDS = [
    'onnxruntime',
    pytest.param(
        'openvino',
        marks=pytest.mark.skipif(
            importlib.util.find_spec('openvino') is None,
            reason='OpenVINO not installed',
        ),
    ),
]


@pytest.mark.parametrize('backend', RUNNER_BACKENDS)
@pytest.mark.parametrize(
    'case,key,fix',
    [(name, key, fix) for name, _, key, fix in BAD_METADATA]
    + [
        ('truncated', 'cannot load it', 'export_onnx.py'),
        ('missing', 'no such file', 'export_onnx.py'),
    ],
)
def test_runner_refuses_a_bad_file_in_one_line(
    atss_file, images, tmp_path, capsys, backend, case, key, fix
):
    """Issue 33: metadata that would give wrong detections without a word
    (negative or zero std), a traceback (pad divisor 0, an unknown
    interpolation, a missing key, a truncated or missing file) or an
    allocation the file chooses (an absurd resize scale) is refused when
    the file is opened: one line naming the file, the key and the fix,
    exit status 2, in both backends."""
    import mmdet_dyhead_runtime as rt

    _, path = atss_file
    bad = _bad_file(path, str(tmp_path / f'{case}.onnx'), case)
    out = str(tmp_path / 'dets.json')
    status = rt.main([bad, images[0], '--backend', backend, '--out-json', out])
    err = capsys.readouterr().err
    assert status == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith('error: ') and bad in err, err
    assert key in err and fix in err, err
    assert not osp.exists(out)


def test_runner_command_refuses_bad_files_without_torch(
    atss_file, images, tmp_path
):
    """The same refusals from ``python -m mmdet_dyhead_runtime`` where
    torch cannot be imported: exit status 2, one line, no traceback."""
    _, path = atss_file
    env = torch_free_env(tmp_path, REPO_ROOT)
    for case in ('zero_std', 'absurd_scale', 'truncated'):
        bad = _bad_file(path, str(tmp_path / f'{case}.onnx'), case)
        proc = subprocess.run(
            [sys.executable, '-m', 'mmdet_dyhead_runtime', bad, images[0]],
            env=env,
            cwd=str(tmp_path),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, (case, proc.stderr[-3000:])
        assert proc.stdout == ''
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and bad in lines[0], (case, proc.stderr)
