"""A two-stage detector's test-time forward as torch ops that trace to
standard ONNX: RPN proposals, multi-level RoIAlign, box head, per-class NMS.

:class:`TwoStageWithPostprocess` maps the preprocessed batch to final
detections like :class:`~.postprocess.DetectorWithPostprocess` does for
one-stage detectors, and follows mmdet's ``TwoStageDetector.predict``:

1. backbone and necks (``extract_feat``);
2. the RPN's proposals: :func:`~.postprocess.dense_candidates` (the
   ``test_cfg.rpn.nms_pre`` best anchors per level, decoded and clamped,
   boxes not wider and higher than ``min_bbox_size`` dropped), NMS per
   pyramid level (mmdet's ``RPNHead``), the ``max_per_img`` best kept;
3. each proposal pooled from the level mmdet's ``SingleRoIExtractor``
   picks (``floor(log2(sqrt(w * h) / finest_scale + 1e-6))``, clamped)
   by ONNX ``RoiAlign`` (``half_pixel``: mmcv's ``aligned=True``);
4. the box head (any module of standard layers: ``Shared2FCBBoxHead``,
   ``TaskAttnBBoxHead``), softmax scores, boxes decoded per class from the
   proposal and clamped, ``test_cfg.rcnn.score_thr``, NMS per class and
   the ``max_per_img`` best (mmdet's ``multiclass_nms``).

Shapes stay fixed: the RPN always yields ``test_cfg.rpn.max_per_img``
proposals; unused ones are zero boxes whose detections are rejected.
"""

from typing import Dict, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .postprocess import (
    INVALID,
    SUPPORTED_CODERS,
    PostprocessError,
    _decode,
    dense_candidates,
    dense_head_settings,
    nms_topk,
)

# The RoI heads and extractors the graph reproduces.
SUPPORTED_ROI_HEADS = ('StandardRoIHead',)
SUPPORTED_EXTRACTORS = ('SingleRoIExtractor',)


class _RoiAlign(torch.autograd.Function):
    """ONNX ``RoiAlign`` (opset 16), with mmcv's ``roi_align`` as forward.

    ``coordinate_transformation_mode='half_pixel'`` shifts the box by half
    a pixel and does not force it to at least 1 x 1, which is mmcv's
    ``aligned=True``; with ``sampling_ratio`` 0 both take
    ``ceil(roi size / output size)`` samples per bin and average them.
    """

    @staticmethod
    def forward(ctx, feat, rois, batch_idx, out_h, out_w, scale, ratio):
        from mmcv.ops import roi_align

        boxes = torch.cat([batch_idx[:, None].to(rois.dtype), rois], 1)
        return roi_align(
            feat, boxes, (out_h, out_w), scale, ratio, 'avg', True
        )

    @staticmethod
    def symbolic(g, feat, rois, batch_idx, out_h, out_w, scale, ratio):
        return g.op(
            'RoiAlign',
            feat,
            rois,
            batch_idx,
            coordinate_transformation_mode_s='half_pixel',
            mode_s='avg',
            output_height_i=out_h,
            output_width_i=out_w,
            sampling_ratio_i=ratio,
            spatial_scale_f=scale,
        )


def _roi_layer_settings(extractor) -> Dict:
    """The extractor's RoIAlign settings; PostprocessError if the graph
    cannot reproduce them."""
    name = type(extractor).__name__
    if name not in SUPPORTED_EXTRACTORS:
        raise PostprocessError(
            f'roi_head.bbox_roi_extractor is {name}; the graph reproduces '
            f'{SUPPORTED_EXTRACTORS} only.'
        )
    if getattr(extractor, 'roi_scale_factor', None) not in (None, 1.0):
        raise PostprocessError('roi_scale_factor is not supported in ONNX.')
    layers = extractor.roi_layers
    for layer in layers:
        kind = type(layer).__name__
        if kind != 'RoIAlign' or getattr(layer, 'pool_mode', 'avg') != 'avg':
            raise PostprocessError(
                f'the RoI layers are {kind} (pool_mode '
                f'{getattr(layer, "pool_mode", None)!r}); the graph has '
                f"ONNX RoiAlign for mmcv's RoIAlign with pool_mode='avg'."
            )
        if not layer.aligned:
            raise PostprocessError(
                'RoIAlign(aligned=False) has no ONNX RoiAlign mode that '
                "matches it at opset 16 ('output_half_pixel' forces boxes to "
                "1 x 1 like it, but mmdet's configs use aligned=True); set "
                'roi_layer.aligned=True (the mmdet default) and retrain.'
            )
    first = layers[0]
    return dict(
        output_size=[int(v) for v in first.output_size],
        sampling_ratio=int(first.sampling_ratio),
        spatial_scales=[float(layer.spatial_scale) for layer in layers],
        finest_scale=float(extractor.finest_scale),
    )


def two_stage_settings(detector) -> Dict:
    """What the graph of a two-stage detector bakes in.

    Args:
        detector (TwoStageDetector): Faster R-CNN (``StandardRoIHead``
            without a mask head), with an ``RPNHead``-like dense head.

    Returns:
        dict: The final stage's ``score_thr``, ``iou_threshold``,
        ``class_agnostic``, ``max_per_img`` (``test_cfg.rcnn``; ``nms_pre``
        -1, ``min_bbox_size`` -1), plus ``rpn`` (the RPN's
        :func:`~.postprocess.dense_head_settings`) and ``roi`` (RoIAlign
        settings).

    Raises:
        PostprocessError: A part that the graph does not reproduce (cascade
            or mask heads, another RoI layer, soft-NMS, ...).
    """
    roi_head = detector.roi_head
    kind = type(roi_head).__name__
    if kind not in SUPPORTED_ROI_HEADS or roi_head.with_mask:
        what = 'a mask head' if roi_head.with_mask else kind
        raise PostprocessError(
            f'{type(detector).__name__} has {what}: the ONNX export of '
            f'two-stage detectors covers Faster R-CNN ({SUPPORTED_ROI_HEADS}'
            f' with a box head only). Run it in PyTorch instead: '
            f"tools/image_demo.py or mmdet's DetInferencer "
            f'(docs/inference.md), tools/test.py for COCO AP.'
        )
    rpn = dict(dense_head_settings(detector.rpn_head))
    # mmdet's RPN keeps proposals of any score.
    rpn['score_thr'] = INVALID / 2
    head = roi_head.bbox_head
    coder = type(head.bbox_coder).__name__
    if coder not in SUPPORTED_CODERS or not (head.with_cls and head.with_reg):
        raise PostprocessError(
            f'{type(head).__name__} with {coder}: the graph decodes '
            f'{SUPPORTED_CODERS} and needs a classifier and a regressor.'
        )
    if head.custom_cls_channels:
        raise PostprocessError(
            f'{type(head).__name__} has custom class channels; the graph '
            f'takes softmax scores.'
        )
    cfg = roi_head.test_cfg
    nms = dict(cfg.get('nms') or {})
    if nms.get('type', 'nms') != 'nms' or cfg.get('max_per_img') is None:
        raise PostprocessError(
            f'test_cfg.rcnn.nms {nms} / max_per_img '
            f'{cfg.get("max_per_img")}: the graph has plain NMS '
            f"(type='nms') and a fixed max_per_img."
        )
    return dict(
        head=f'{kind}.{type(head).__name__}',
        bbox_coder=coder,
        score_thr=float(cfg.get('score_thr', 0.0)),
        nms_pre=-1,
        iou_threshold=float(nms['iou_threshold']),
        class_agnostic=bool(nms.get('class_agnostic', False)),
        max_per_img=int(cfg['max_per_img']),
        min_bbox_size=-1.0,
        rpn=rpn,
        roi=_roi_layer_settings(roi_head.bbox_roi_extractor),
    )


class TwoStageWithPostprocess(nn.Module):
    """A two-stage detector whose forward ends in final detections.

    Args:
        detector (TwoStageDetector): Faster R-CNN with any neck (FPN,
            DyHeadNeck) and box head of standard layers; settings from its
            ``test_cfg`` (see :func:`two_stage_settings`).

    Shapes:
        As :class:`~.postprocess.DetectorWithPostprocess`: images
        (N, 3, H, W) and img_shape (N, 2) -> ``dets`` (N, K, 5) and
        ``labels`` (N, K), K = ``test_cfg.rcnn.max_per_img``.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        self.settings = two_stage_settings(detector)
        # mmcv's compiled RoIAlign layers, written as ONNX RoiAlign.
        layers = detector.roi_head.bbox_roi_extractor.roi_layers
        self.replaced_modules = tuple(
            f'roi_head.bbox_roi_extractor.roi_layers.{i}'
            for i in range(len(layers))
        )

    def forward(self, images: Tensor, img_shape: Tensor):
        det = self.detector
        img_shape = img_shape.to(images.dtype)
        feats = det.extract_feat(images)
        proposals, proposal_ok = self.proposals(feats, img_shape)
        return self.detect(feats, proposals, proposal_ok, img_shape)

    def proposals(self, feats, img_shape: Tensor) -> Tuple[Tensor, Tensor]:
        """Step 2: ``boxes`` (N, P, 4) and which of them are used (N, P),
        P = ``test_cfg.rpn.max_per_img``."""
        rpn = self.detector.rpn_head
        cls_scores, bbox_preds = rpn(feats)
        s = self.settings['rpn']
        boxes, scores, levels = dense_candidates(
            rpn,
            s,
            cls_scores,
            bbox_preds,
            None,
            img_shape,
            group_by_level=True,
        )
        dets, used = nms_topk(boxes, scores, levels, s)
        return dets[..., :4], used >= 0

    def pool(self, feats, rois: Tensor, batch_idx: Tensor) -> Tensor:
        """Step 3: RoI features (R, C, S, S) of ``rois`` (R, 4)."""
        r = self.settings['roi']
        scales = r['spatial_scales']
        wh = rois[:, 2:] - rois[:, :2]
        level = torch.floor(
            torch.log2(
                torch.sqrt(wh[:, 0] * wh[:, 1]) / r['finest_scale'] + 1e-6
            )
        ).clamp(min=0, max=len(scales) - 1)
        out_h, out_w = r['output_size']
        pooled = None
        # Every RoI is pooled from every level and the right one kept: a
        # static graph without data-dependent gathers.
        for i, scale in enumerate(scales):
            p = _RoiAlign.apply(
                feats[i],
                rois,
                batch_idx,
                out_h,
                out_w,
                scale,
                r['sampling_ratio'],
            )
            if pooled is None:
                pooled = p
            else:
                pooled = torch.where((level == i).view(-1, 1, 1, 1), p, pooled)
        return pooled

    def detect(
        self, feats, proposals: Tensor, proposal_ok: Tensor, img_shape
    ) -> Tuple[Tensor, Tensor]:
        """Steps 3-4: proposals (N, P, 4) -> ``(dets, labels)``."""
        roi_head = self.detector.roi_head
        head = roi_head.bbox_head
        s = self.settings
        n, p = proposals.shape[0], proposals.shape[1]
        rois = proposals.reshape(-1, 4)
        batch_idx = (
            torch.arange(n, device=rois.device).view(-1, 1).expand(-1, p)
        ).reshape(-1)
        x = feats[: roi_head.bbox_roi_extractor.num_inputs]
        cls_score, bbox_pred = head(self.pool(x, rois, batch_idx))
        prob = cls_score.softmax(-1)[:, :-1]
        c = prob.shape[1]
        dim = head.bbox_coder.encode_size
        bbox_pred = bbox_pred.reshape(n, p, -1, dim).expand(-1, -1, c, -1)
        priors = proposals.unsqueeze(2).expand(-1, -1, c, -1)
        boxes = _decode(
            head.bbox_coder,
            priors.reshape(n, p * c, 4),
            bbox_pred.reshape(n, p * c, dim),
            img_shape,
        )
        prob = prob.reshape(n, p, c)
        valid = (prob > s['score_thr']) & proposal_ok.unsqueeze(-1)
        scores = torch.where(valid, prob, prob.new_tensor(INVALID))
        labels = torch.arange(c, device=rois.device).view(1, 1, -1)
        labels = (labels + proposal_ok.long().unsqueeze(-1) * 0).expand(
            n, p, c
        )
        return nms_topk(
            boxes, scores.reshape(n, p * c), labels.reshape(n, p * c), s
        )
