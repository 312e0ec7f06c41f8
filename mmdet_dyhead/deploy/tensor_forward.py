"""The detector's tensor forward as a module with flat tensor outputs."""

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

# Names of the groups a dense head's forward returns, by head output count.
_GROUP_NAMES = {
    2: ('cls_score', 'bbox_pred'),
    3: ('cls_score', 'bbox_pred', 'centerness'),
}


class DetectorTensorForward(nn.Module):
    """Backbone + neck(s) + dense head, raw outputs only (no decoding/NMS).

    ``SingleStageDetector._forward`` returns one list per output kind
    (ATSS: class scores, box deltas, centerness), each with one tensor per
    pyramid level. ONNX graphs need a flat tuple, so this wrapper flattens
    group-major: ``cls_score_0 .. cls_score_{L-1}, bbox_pred_0, ...``.
    :meth:`unflatten` restores the grouping for ``predict_by_feat``.

    Args:
        detector (SingleStageDetector): A one-stage mmdet detector (ATSS,
            FCOS, RetinaNet, ...). Two-stage detectors need RoI ops between
            their stages and are not supported.

    Shapes:
        input: (N, 3, H, W) normalised, padded images (the data
        preprocessor's output); outputs: G * L tensors (N, C_g, H_l, W_l).
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        from mmdet.models.detectors import SingleStageDetector

        if not isinstance(detector, SingleStageDetector):
            raise TypeError(
                f'{type(detector).__name__} is not a single-stage detector; '
                f'ONNX export here covers dense-head detectors (ATSS, FCOS, '
                f'RetinaNet, ...) whose forward is convolutions only.'
            )
        self.detector = detector
        self.num_groups = None
        self.num_levels = None

    def forward(self, images: Tensor) -> Tuple[Tensor, ...]:
        groups = self.detector._forward(images)
        self.num_groups = len(groups)
        self.num_levels = len(groups[0])
        return tuple(t for group in groups for t in group)

    def unflatten(self, flat: Sequence) -> List[List]:
        """Flat outputs (tensors or arrays) -> one list per group."""
        if self.num_groups is None:
            raise RuntimeError('run the module once before unflatten().')
        if len(flat) != self.num_groups * self.num_levels:
            raise ValueError(
                f'expected {self.num_groups * self.num_levels} '
                f'outputs, got {len(flat)}.'
            )
        n = self.num_levels
        return [
            list(flat[g * n : (g + 1) * n]) for g in range(self.num_groups)
        ]

    def output_names(self) -> List[str]:
        """``cls_score_0, ...``: the ONNX output names, in flat order."""
        if self.num_groups is None:
            raise RuntimeError('run the module once before output_names().')
        groups = _GROUP_NAMES.get(
            self.num_groups, tuple(f'out{g}' for g in range(self.num_groups))
        )
        return [f'{g}_{lvl}' for g in groups for lvl in range(self.num_levels)]


def decode_raw_outputs(
    detector: nn.Module,
    groups: Sequence[Sequence],
    data_samples: Sequence,
    rescale: bool = True,
) -> List:
    """Boxes, scores and labels from raw head outputs, via mmdet's own code.

    Runs ``bbox_head.predict_by_feat`` (anchor decoding, score threshold,
    NMS from the config's ``test_cfg``), i.e. what ``model.predict`` does
    after the tensor forward. Use it on onnxruntime outputs to get the same
    post-processing as PyTorch.

    Args:
        detector (SingleStageDetector): The model the outputs came from.
        groups (Sequence[Sequence]): Per group, L arrays or tensors
            (N, C_g, H_l, W_l), as from
            :meth:`DetectorTensorForward.unflatten`.
        data_samples (Sequence[DetDataSample]): One per image, holding the
            meta information (``img_shape``, ``scale_factor``).
        rescale (bool): Map boxes back to the original image size.

    Returns:
        list[InstanceData]: Per image ``bboxes`` (K, 4) xyxy,
        ``scores`` (K,), ``labels`` (K,).
    """
    tensors = [[torch.as_tensor(t) for t in g] for g in groups]
    metas = [s.metainfo for s in data_samples]
    with torch.no_grad():
        return detector.bbox_head.predict_by_feat(
            *tensors, batch_img_metas=metas, rescale=rescale
        )
