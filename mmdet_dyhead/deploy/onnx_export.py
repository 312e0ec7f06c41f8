"""Export a detector's tensor forward to ONNX and check it with onnxruntime."""

import json
import warnings
from collections import Counter
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from mmdet_dyhead.utils.misc import check_choice

from .dcn_onnx import DEFORM_CONV_MIN_OPSET, ONNX_DCN_FORMS, onnx_dcn_export
from .inputs import preprocess_settings
from .native_backend import check_exportable_modules
from .postprocess import INPUT_NAMES, OUTPUT_NAMES, end_to_end_module
from .tensor_forward import DetectorTensorForward

# metadata_props['mmdet_dyhead.format'] of end-to-end files; the runner
# refuses files of another format.
DEPLOY_FORMAT = 'mmdet_dyhead.detections.v1'

# GridSample (the decomposed DCN) exists in ONNX from opset 16 on.
MIN_OPSET = 16
# DeformConv needs opset 19; it is the default DCN form, so 19 is the
# default opset (the TorchScript exporter goes up to 20).
DEFAULT_OPSET = DEFORM_CONV_MIN_OPSET


def resolve_dcn_export(dcn_export: Optional[str], opset: int) -> str:
    """The DCN form to write at ``opset``: ``None`` picks the default.

    Args:
        dcn_export (str, optional): ``'deform_conv'``, ``'grid_sample'`` or
            None (``'deform_conv'`` from opset 19 on, ``'grid_sample'``
            below).
        opset (int): The ONNX opset of the export.

    Returns:
        str: ``'deform_conv'`` or ``'grid_sample'``.

    Raises:
        ValueError: Unknown form, an opset without GridSample, or
            ``'deform_conv'`` below opset 19.
    """
    if opset < MIN_OPSET:
        raise ValueError(
            f'opset {opset} has no GridSample (opset {MIN_OPSET}) nor '
            f'DeformConv (opset {DEFORM_CONV_MIN_OPSET}); use --opset '
            f'{DEFAULT_OPSET} (or >= {MIN_OPSET} with --dcn-export '
            f'grid_sample).'
        )
    if dcn_export is None:
        if opset >= DEFORM_CONV_MIN_OPSET:
            return 'deform_conv'
        return 'grid_sample'
    check_choice('dcn_export', dcn_export, ONNX_DCN_FORMS)
    if dcn_export == 'deform_conv' and opset < DEFORM_CONV_MIN_OPSET:
        raise ValueError(
            f'--dcn-export deform_conv needs ONNX opset >= '
            f'{DEFORM_CONV_MIN_OPSET} (DeformConv was added in opset '
            f'{DEFORM_CONV_MIN_OPSET}), got --opset {opset}. Use --opset '
            f'{DEFORM_CONV_MIN_OPSET}, or --dcn-export grid_sample for '
            f'runtimes without DeformConv.'
        )
    return dcn_export


def export_onnx(
    detector,
    images: Tensor,
    out_file: str,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    dcn_export: Optional[str] = None,
    postprocess: bool = False,
    img_shape: Optional[Tensor] = None,
) -> List[str]:
    """Write ``detector``'s raw tensor forward (or, with ``postprocess``,
    its detections) to ``out_file``.

    Uses torch's TorchScript-based exporter (``dynamo=False``): it needs no
    extra package (the dynamo exporter needs ``onnxscript``) and handles the
    data-independent control flow of DyHead. Decoding and NMS stay outside
    the graph; run :func:`decode_raw_outputs` on the outputs.

    Each DyHead DCN becomes one standard ``DeformConv`` node
    (``dcn_export='deform_conv'``, opset >= 19; onnxruntime >= 1.25) or
    ``GridSample`` + ``MatMul`` and index arithmetic (``'grid_sample'``,
    opset >= 16; any runtime). Both read the offsets and masks the PyTorch
    model computes, including the legacy high-branch layout.

    Args:
        detector (SingleStageDetector | TwoStageDetector): Built with
            ``dcn_backend='torch'``; two-stage ones with ``postprocess``
            only.
        images (Tensor): Example input (N, 3, H, W), e.g. from
            :func:`load_images`; its values only drive tracing.
        out_file (str): Path of the ``.onnx`` file.
        opset (int): ONNX opset, >= 16. Default 19.
        dynamic (bool): Batch, height and width as dynamic axes, so one file
            serves every image size the test pipeline produces. False fixes
            them to ``images.shape``.
        dcn_export (str, optional): ``'deform_conv'`` or ``'grid_sample'``;
            None picks :func:`resolve_dcn_export`'s default for ``opset``.
        postprocess (bool): End-to-end graph
            (:class:`~.postprocess.DetectorWithPostprocess`, or
            :class:`~.two_stage.TwoStageWithPostprocess` for Faster and
            Cascade R-CNN):
            inputs
            ``input`` and ``img_shape`` (N, 2), outputs ``dets``
            (N, max_per_img, 5) and ``labels`` (N, max_per_img); the
            test_cfg and the preprocessing go into the file's
            ``metadata_props`` (:func:`deploy_metadata`).
        img_shape (Tensor, optional): (N, 2) (height, width) to trace the
            end-to-end graph with; default: the whole of ``images``.

    Returns:
        list[str]: Output names in graph order (``cls_score_0``, ... or
        ``dets``, ``labels``).

    Raises:
        PostprocessError: ``postprocess`` for a head whose decoding or NMS
            the graph does not reproduce.
    """
    form = resolve_dcn_export(dcn_export, opset)
    if postprocess:
        wrapper = end_to_end_module(detector).eval()
        # mmcv's RoIAlign layers are written as ONNX RoiAlign.
        check_exportable_modules(detector, wrapper.replaced_modules)
        if img_shape is None:
            img_shape = images.new_tensor(images.shape[2:]).repeat(
                len(images), 1
            )
        args = (images, img_shape.float())
        input_names = list(INPUT_NAMES)
        names = list(OUTPUT_NAMES)
    else:
        check_exportable_modules(detector)
        wrapper = DetectorTensorForward(detector).eval()
        with torch.no_grad():
            wrapper(images)
        args = (images,)
        input_names = ['input']
        names = wrapper.output_names()
    dynamic_axes = None
    if dynamic:
        dynamic_axes = {'input': {0: 'batch', 2: 'height', 3: 'width'}}
        if postprocess:
            dynamic_axes.update({n: {0: 'batch'} for n in INPUT_NAMES[1:]})
            dynamic_axes.update({n: {0: 'batch'} for n in names})
        else:
            dynamic_axes.update(
                {n: {0: 'batch', 2: f'h_{n}', 3: f'w_{n}'} for n in names}
            )
    with warnings.catch_warnings():
        # The neck and DCN validate shapes with Python comparisons; the
        # tracer warns that those become constants, which is what checks
        # should do (the graph itself stays shape-generic).
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        with onnx_dcn_export(form):
            torch.onnx.export(
                wrapper,
                args,
                out_file,
                input_names=input_names,
                output_names=names,
                opset_version=opset,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
                dynamo=False,
            )
    # export() puts the wrapper back in the mode it had, but be explicit:
    # BN in training mode would make every later comparison meaningless.
    detector.eval()
    if postprocess:
        _write_metadata(
            out_file,
            deploy_metadata(detector, wrapper.settings, form),
            wrapper.settings['max_per_img'],
        )
    return names


def deploy_metadata(detector, settings: Dict, dcn_form: str) -> Dict:
    """What an end-to-end file records for the torch-free runner.

    Args:
        detector (SingleStageDetector): The exported model (``cfg`` set).
        settings (dict): :func:`~.postprocess.postprocess_settings`.
        dcn_form (str): The DCN form of the graph.

    Returns:
        dict[str, str]: ``metadata_props`` entries: ``mmdet_dyhead.format``,
        ``.postprocess``, ``.preprocess`` and ``.classes`` (JSON), plus
        each test_cfg value under its own key for viewers such as Netron.
    """
    classes = _class_names(detector)
    props = {
        'mmdet_dyhead.format': DEPLOY_FORMAT,
        'mmdet_dyhead.postprocess': json.dumps(settings),
        'mmdet_dyhead.preprocess': json.dumps(
            preprocess_settings(detector.cfg)
        ),
        'mmdet_dyhead.classes': json.dumps(classes),
        'mmdet_dyhead.dcn_export': dcn_form,
    }
    for key in ('score_thr', 'nms_pre', 'iou_threshold', 'max_per_img'):
        props[f'test_cfg.{key}'] = str(settings[key])
    return props


def _class_names(detector) -> List[str]:
    """The config's class names (its test dataset's ``metainfo``), else the
    model's ``dataset_meta``; [] when neither matches the head's classes.

    The config comes first: ``init_detector`` without a checkpoint fills
    ``dataset_meta`` with COCO's 80 names whatever the model was trained on.
    """
    cfg = getattr(detector, 'cfg', None)
    found = []
    try:
        found.append(cfg.test_dataloader.dataset.metainfo['classes'])
    except (AttributeError, KeyError, TypeError):
        pass
    found.append(
        (getattr(detector, 'dataset_meta', None) or {}).get('classes')
    )
    head = getattr(detector, 'bbox_head', None)
    if head is None:  # two-stage; Cascade R-CNN: one head per stage
        head = detector.roi_head.bbox_head
        if isinstance(head, torch.nn.ModuleList):
            head = head[-1]
    num = head.num_classes
    for names in found:
        if names is not None and len(names) == num:
            return [str(n) for n in names]
    return []


def _write_metadata(
    onnx_file: str, props: Dict[str, str], max_per_img: int
) -> None:
    """Store ``props`` in the file and give ``dets``/``labels`` their fixed
    second dimension (the tracer leaves it symbolic)."""
    import onnx

    model = onnx.load(onnx_file)
    onnx.helper.set_model_props(model, props)
    for out in model.graph.output:
        out.type.tensor_type.shape.dim[1].dim_value = max_per_img
    onnx.save(model, onnx_file)


def onnxruntime_session(onnx_file: str, num_threads: Optional[int] = None):
    """An onnxruntime CPU session for ``onnx_file``.

    Args:
        onnx_file (str): Exported model.
        num_threads (int, optional): Intra-op threads; None lets
            onnxruntime choose (one per physical core).

    Returns:
        onnxruntime.InferenceSession: On ``CPUExecutionProvider``.

    Raises:
        RuntimeError: The runtime has no ``DeformConv`` kernel (onnxruntime
            before 1.25); the message says how to export without it.
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ImportError(
            'onnxruntime is needed to run the exported model: '
            'pip install onnxruntime (or the "deploy" extra).'
        ) from e
    # The torch-free runner's session: one place for the threads and the
    # message an onnxruntime without a DeformConv kernel gets.
    from mmdet_dyhead_runtime import make_session

    return make_session(onnx_file, num_threads)


def run_onnxruntime(
    onnx_file: str, images: Tensor, num_threads: Optional[int] = None
) -> List[np.ndarray]:
    """Outputs of ``onnx_file`` on ``images`` with onnxruntime's CPU provider.

    Args:
        onnx_file (str): Exported model.
        images (Tensor): (N, 3, H, W) float32.
        num_threads (int, optional): Intra-op threads (None: onnxruntime's
            default).

    Returns:
        list[np.ndarray]: The graph outputs in order.
    """
    session = onnxruntime_session(onnx_file, num_threads)
    return session.run(None, {'input': images.detach().cpu().float().numpy()})


def graph_op_counts(onnx_file: str) -> Dict[str, int]:
    """How often each operator type occurs in the main graph of a model.

    Args:
        onnx_file (str): An ONNX file.

    Returns:
        dict[str, int]: ``{op_type: count}``, plus ``'total'``.
    """
    import onnx

    nodes = onnx.load(onnx_file, load_external_data=False).graph.node
    counts = Counter(n.op_type for n in nodes)
    counts['total'] = len(nodes)
    return dict(counts)


def match_detections(ref, other, box_tol: float, score_tol: float) -> Dict:
    """Pair two detection sets and measure how far apart they are.

    Each reference detection (in descending score order) is paired with the
    unpaired detection of the same label whose box is closest (max
    coordinate difference); NMS output order may swap near-equal scores, so
    index-wise comparison would be wrong.

    Args:
        ref, other (InstanceData): ``bboxes`` (K, 4), ``scores`` (K,),
            ``labels`` (K,).
        box_tol (float): Allowed box coordinate difference in pixels.
        score_tol (float): Allowed score difference.

    Returns:
        dict: ``count_ref``, ``count_other``, ``max_box_diff``,
        ``max_score_diff``, ``unmatched`` and ``ok`` (counts equal, every
        detection paired within both tolerances).
    """
    rb, rs, rl = ref.bboxes.double(), ref.scores.double(), ref.labels
    ob, os_, ol = other.bboxes.double(), other.scores.double(), other.labels
    used = torch.zeros(len(ob), dtype=torch.bool)
    max_box = max_score = 0.0
    unmatched = 0
    for i in torch.argsort(rs, descending=True).tolist():
        cand = (~used) & (ol == rl[i])
        if not cand.any():
            unmatched += 1
            continue
        dist = (ob - rb[i]).abs().amax(dim=1)
        dist[~cand] = float('inf')
        j = int(dist.argmin())
        used[j] = True
        max_box = max(max_box, float(dist[j]))
        max_score = max(max_score, float((os_[j] - rs[i]).abs()))
    ok = (
        len(rb) == len(ob)
        and unmatched == 0
        and max_box <= box_tol
        and max_score <= score_tol
    )
    return dict(
        count_ref=len(rb),
        count_other=len(ob),
        max_box_diff=max_box,
        max_score_diff=max_score,
        unmatched=unmatched,
        ok=ok,
    )


def verify_onnx(
    detector,
    onnx_file: str,
    images: Tensor,
    data_samples: Sequence,
    box_tol: float = 0.5,
    score_tol: float = 1e-4,
) -> Dict:
    """Compare PyTorch and onnxruntime on the same preprocessed images.

    Compares the raw head outputs, then the detections both produce after
    the same mmdet post-processing (:func:`decode_raw_outputs`).

    Args:
        detector (SingleStageDetector): The exported model (eval mode).
        onnx_file (str): Its ONNX file.
        images (Tensor): (N, 3, H, W) preprocessed images.
        data_samples (Sequence[DetDataSample]): Their meta information.
        box_tol (float): Allowed box difference in pixels (after rescale).
        score_tol (float): Allowed score difference.

    Returns:
        dict: ``max_raw_abs_diff``, ``max_raw_rel_diff`` over all outputs,
        and per image the :func:`match_detections` report under
        ``images``; ``ok`` if every image passed.
    """
    from .tensor_forward import decode_raw_outputs

    wrapper = DetectorTensorForward(detector).eval()
    with torch.no_grad():
        ref_flat = wrapper(images)
    ort_flat = run_onnxruntime(onnx_file, images)
    if len(ort_flat) != len(ref_flat):
        raise ValueError(
            f'{onnx_file} has {len(ort_flat)} outputs but the '
            f'model gives {len(ref_flat)}; was it exported from '
            f'another config?'
        )
    abs_diff = max(
        float(np.abs(o - r.numpy()).max()) for o, r in zip(ort_flat, ref_flat)
    )
    rel_diff = max(
        float(
            np.abs(o - r.numpy()).max() / max(np.abs(r.numpy()).max(), 1e-12)
        )
        for o, r in zip(ort_flat, ref_flat)
    )
    ref_dets = decode_raw_outputs(
        detector, wrapper.unflatten(ref_flat), data_samples
    )
    ort_dets = decode_raw_outputs(
        detector,
        wrapper.unflatten([torch.from_numpy(o) for o in ort_flat]),
        data_samples,
    )
    per_image = [
        match_detections(r, o, box_tol, score_tol)
        for r, o in zip(ref_dets, ort_dets)
    ]
    return dict(
        max_raw_abs_diff=abs_diff,
        max_raw_rel_diff=rel_diff,
        images=per_image,
        ok=all(p['ok'] for p in per_image),
        torch_dets=ref_dets,
        ort_dets=ort_dets,
    )


def img_shapes(data_samples: Sequence) -> Tensor:
    """(N, 2) float32 (height, width) of each image inside the batch: the
    end-to-end graph's ``img_shape`` input.

    Args:
        data_samples (Sequence[DetDataSample]): From :func:`load_images`.
    """
    return torch.tensor(
        [s.metainfo['img_shape'][:2] for s in data_samples],
        dtype=torch.float32,
    )


def detections_from_outputs(dets, labels) -> List:
    """The end-to-end graph's padded outputs as one InstanceData per image.

    Args:
        dets (np.ndarray | Tensor): (N, K, 5) x1, y1, x2, y2, score.
        labels (np.ndarray | Tensor): (N, K), -1 in unused rows.

    Returns:
        list[InstanceData]: ``bboxes`` (k, 4), ``scores`` (k,), ``labels``
        (k,) of the used rows, in the input's pixels.
    """
    from mmengine.structures import InstanceData

    dets, labels = torch.as_tensor(dets), torch.as_tensor(labels)
    out = []
    for d, lab in zip(dets, labels):
        used = lab >= 0
        out.append(
            InstanceData(
                bboxes=d[used, :4], scores=d[used, 4], labels=lab[used]
            )
        )
    return out


def verify_end_to_end(
    detector,
    onnx_file: str,
    images: Tensor,
    data_samples: Sequence,
    box_tol: float = 0.5,
    score_tol: float = 1e-4,
) -> Dict:
    """An end-to-end file in onnxruntime against mmdet's ``predict``.

    The reference is ``detector.predict(images, data_samples,
    rescale=False)``: mmdet's own post-processing, boxes in input pixels
    like the graph's.

    Args:
        detector (SingleStageDetector): The exported model (eval mode).
        onnx_file (str): Its end-to-end ONNX file.
        images (Tensor): (N, 3, H, W) preprocessed images.
        data_samples (Sequence[DetDataSample]): Their meta information.
        box_tol (float): Allowed box difference in pixels.
        score_tol (float): Allowed score difference.

    Returns:
        dict: Per image the :func:`match_detections` report under
        ``images``; ``ok`` if every image passed; ``torch_dets`` and
        ``ort_dets`` (lists of InstanceData).
    """
    session = onnxruntime_session(onnx_file)
    dets, labels = session.run(
        None,
        {
            'input': images.detach().cpu().float().numpy(),
            'img_shape': img_shapes(data_samples).numpy(),
        },
    )
    ort_dets = detections_from_outputs(dets, labels)
    with torch.no_grad():
        ref = detector.predict(images, list(data_samples), rescale=False)
    ref_dets = [r.pred_instances for r in ref]
    per_image = [
        match_detections(r, o, box_tol, score_tol)
        for r, o in zip(ref_dets, ort_dets)
    ]
    return dict(
        images=per_image,
        ok=all(p['ok'] for p in per_image),
        torch_dets=ref_dets,
        ort_dets=ort_dets,
    )
