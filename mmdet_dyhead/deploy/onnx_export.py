"""Export a detector's tensor forward to ONNX and check it with onnxruntime."""

import warnings
from typing import Dict, List, Sequence

import numpy as np
import torch
from torch import Tensor

from .native_backend import check_exportable_modules
from .tensor_forward import DetectorTensorForward

# grid_sample (native DCN) exists in ONNX from opset 16 on.
MIN_OPSET = 16


def export_onnx(
    detector,
    images: Tensor,
    out_file: str,
    opset: int = 17,
    dynamic: bool = True,
) -> List[str]:
    """Write ``detector``'s raw tensor forward to ``out_file``.

    Uses torch's TorchScript-based exporter (``dynamo=False``): it needs no
    extra package (the dynamo exporter needs ``onnxscript``) and handles the
    data-independent control flow of DyHead. Decoding and NMS stay outside
    the graph; run :func:`decode_raw_outputs` on the outputs.

    Args:
        detector (SingleStageDetector): Built with ``dcn_backend='torch'``.
        images (Tensor): Example input (N, 3, H, W), e.g. from
            :func:`load_images`; its values only drive tracing.
        out_file (str): Path of the ``.onnx`` file.
        opset (int): ONNX opset, >= 16 (``GridSample``).
        dynamic (bool): Batch, height and width as dynamic axes, so one file
            serves every image size the test pipeline produces. False fixes
            them to ``images.shape``.

    Returns:
        list[str]: Output names in graph order (``cls_score_0``, ...).
    """
    if opset < MIN_OPSET:
        raise ValueError(
            f'opset {opset} has no GridSample, which the native '
            f'DCN exports to; use --opset {MIN_OPSET} or higher.'
        )
    check_exportable_modules(detector)
    wrapper = DetectorTensorForward(detector).eval()
    with torch.no_grad():
        wrapper(images)
    names = wrapper.output_names()
    dynamic_axes = None
    if dynamic:
        dynamic_axes = {'input': {0: 'batch', 2: 'height', 3: 'width'}}
        dynamic_axes.update(
            {n: {0: 'batch', 2: f'h_{n}', 3: f'w_{n}'} for n in names}
        )
    with warnings.catch_warnings():
        # The neck and DCN validate shapes with Python comparisons; the
        # tracer warns that those become constants, which is what checks
        # should do (the graph itself stays shape-generic).
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        torch.onnx.export(
            wrapper,
            (images,),
            out_file,
            input_names=['input'],
            output_names=names,
            opset_version=opset,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
            dynamo=False,
        )
    # export() puts the wrapper back in the mode it had, but be explicit:
    # BN in training mode would make every later comparison meaningless.
    detector.eval()
    return names


def run_onnxruntime(onnx_file: str, images: Tensor) -> List[np.ndarray]:
    """Outputs of ``onnx_file`` on ``images`` with onnxruntime's CPU provider.

    Args:
        onnx_file (str): Exported model.
        images (Tensor): (N, 3, H, W) float32.

    Returns:
        list[np.ndarray]: The graph outputs in order.
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError(
            'onnxruntime is needed to run the exported model: '
            'pip install onnxruntime (or the "deploy" extra).'
        ) from e
    session = ort.InferenceSession(
        onnx_file, providers=['CPUExecutionProvider']
    )
    return session.run(None, {'input': images.detach().cpu().float().numpy()})


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
