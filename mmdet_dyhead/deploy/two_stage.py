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
   ``TaskAttnBBoxHead``); Cascade R-CNN: each stage but the last moves the
   RoIs by its deltas of its best class (``regress_by_class``) for the
   next, and the class logits of all stages are averaged
   (``CascadeRoIHead.predict_bbox``);
5. softmax scores, boxes decoded per class from the last stage's RoIs and
   clamped, ``test_cfg.rcnn.score_thr``, NMS per class and the
   ``max_per_img`` best (mmdet's ``multiclass_nms``).

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
SUPPORTED_ROI_HEADS = ('StandardRoIHead', 'CascadeRoIHead')
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


def _stages(roi_head):
    """``(box head, RoI extractor)`` per stage: one for Faster R-CNN,
    ``num_stages`` for Cascade R-CNN."""
    heads, extractors = roi_head.bbox_head, roi_head.bbox_roi_extractor
    if isinstance(heads, nn.ModuleList):
        return list(zip(heads, extractors))
    return [(heads, extractors)]


def _check_box_head(head) -> str:
    """The head's coder name; PostprocessError if the graph cannot run
    it."""
    coder = type(head.bbox_coder).__name__
    if coder not in SUPPORTED_CODERS or not (head.with_cls and head.with_reg):
        raise PostprocessError(
            f'{type(head).__name__} with {coder}: the graph decodes '
            f'{SUPPORTED_CODERS} and needs a classifier and a regressor.'
        )
    if head.custom_cls_channels or getattr(head, 'custom_activation', False):
        raise PostprocessError(
            f'{type(head).__name__} has custom class channels or '
            f'activation; the graph takes softmax scores.'
        )
    return coder


def two_stage_settings(detector) -> Dict:
    """What the graph of a two-stage detector bakes in.

    Args:
        detector (TwoStageDetector): Faster R-CNN (``StandardRoIHead``) or
            Cascade R-CNN (``CascadeRoIHead``), without a mask head, with
            an ``RPNHead``-like dense head.

    Returns:
        dict: The final stage's ``score_thr``, ``iou_threshold``,
        ``class_agnostic``, ``max_per_img`` (``test_cfg.rcnn``; ``nms_pre``
        -1, ``min_bbox_size`` -1), plus ``rpn`` (the RPN's
        :func:`~.postprocess.dense_head_settings`) and ``roi`` (RoIAlign
        settings, one dict per stage).

    Raises:
        PostprocessError: A part that the graph does not reproduce (mask
            heads, another RoI layer, soft-NMS, ...).
    """
    roi_head = detector.roi_head
    kind = type(roi_head).__name__
    if kind not in SUPPORTED_ROI_HEADS or roi_head.with_mask:
        what = 'a mask head' if roi_head.with_mask else kind
        raise PostprocessError(
            f'{type(detector).__name__} has {what}: the ONNX export of '
            f'two-stage detectors covers Faster and Cascade R-CNN '
            f'({SUPPORTED_ROI_HEADS} with box heads only). Run it in '
            f"PyTorch instead: tools/image_demo.py or mmdet's DetInferencer "
            f'(docs/inference.md), tools/test.py for COCO AP.'
        )
    rpn = dict(dense_head_settings(detector.rpn_head))
    # mmdet's RPN keeps proposals of any score.
    rpn['score_thr'] = INVALID / 2
    stages = _stages(roi_head)
    coders = [_check_box_head(head) for head, _ in stages]
    cfg = roi_head.test_cfg
    nms = dict(cfg.get('nms') or {})
    if nms.get('type', 'nms') != 'nms' or cfg.get('max_per_img') is None:
        raise PostprocessError(
            f'test_cfg.rcnn.nms {nms} / max_per_img '
            f'{cfg.get("max_per_img")}: the graph has plain NMS '
            f"(type='nms') and a fixed max_per_img."
        )
    return dict(
        head=f'{kind}.{type(stages[-1][0]).__name__}',
        bbox_coder=coders[-1],
        score_thr=float(cfg.get('score_thr', 0.0)),
        nms_pre=-1,
        iou_threshold=float(nms['iou_threshold']),
        class_agnostic=bool(nms.get('class_agnostic', False)),
        max_per_img=int(cfg['max_per_img']),
        min_bbox_size=-1.0,
        rpn=rpn,
        roi=[_roi_layer_settings(extractor) for _, extractor in stages],
    )


class TwoStageWithPostprocess(nn.Module):
    """A two-stage detector whose forward ends in final detections.

    Args:
        detector (TwoStageDetector): Faster or Cascade R-CNN with any neck
            (FPN, DyHeadNeck) and box heads of standard layers; settings
            from its ``test_cfg`` (see :func:`two_stage_settings`).

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
        extractors = detector.roi_head.bbox_roi_extractor
        prefix = 'roi_head.bbox_roi_extractor'
        if isinstance(extractors, nn.ModuleList):
            named = [(f'{prefix}.{i}', e) for i, e in enumerate(extractors)]
        else:
            named = [(prefix, extractors)]
        self.replaced_modules = tuple(
            f'{name}.roi_layers.{i}'
            for name, e in named
            for i in range(len(e.roi_layers))
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

    @staticmethod
    def pool(feats, rois: Tensor, batch_idx: Tensor, r: Dict) -> Tensor:
        """Step 3: RoI features (R, C, S, S) of ``rois`` (R, 4) with the
        RoIAlign settings ``r`` (one entry of ``settings['roi']``)."""
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
        """Steps 3-5: proposals (N, P, 4) -> ``(dets, labels)``."""
        s = self.settings
        stages = _stages(self.detector.roi_head)
        n, p = proposals.shape[0], proposals.shape[1]
        batch_idx = (
            torch.arange(n, device=proposals.device)
            .view(-1, 1)
            .expand(-1, p)
            .reshape(-1)
        )
        rois = proposals
        logits = None
        for stage, ((head, extractor), r) in enumerate(zip(stages, s['roi'])):
            x = feats[: extractor.num_inputs]
            cls_score, bbox_pred = head(
                self.pool(x, rois.reshape(-1, 4), batch_idx, r)
            )
            logits = cls_score if stage == 0 else logits + cls_score
            if stage < len(stages) - 1:
                rois = self._refine(
                    head, rois, cls_score, bbox_pred, img_shape
                )
        # CascadeRoIHead averages the stages' logits (one stage: as is).
        if len(stages) > 1:
            logits = logits / float(len(stages))
        return self._final(
            head, rois, logits, bbox_pred, proposal_ok, img_shape
        )

    @staticmethod
    def _refine(head, rois, cls_score, bbox_pred, img_shape) -> Tensor:
        """Cascade: (N, P, 4) RoIs moved by the deltas of each RoI's best
        class (mmdet's ``regress_by_class``)."""
        n, p = rois.shape[0], rois.shape[1]
        dim = head.bbox_coder.encode_size
        if not head.reg_class_agnostic:
            label = cls_score[:, :-1].argmax(dim=1)
            bbox_pred = bbox_pred.reshape(bbox_pred.shape[0], -1, dim)
            bbox_pred = torch.gather(
                bbox_pred, 1, label.view(-1, 1, 1).expand(-1, 1, dim)
            )
        return _decode(
            head.bbox_coder, rois, bbox_pred.reshape(n, p, dim), img_shape
        )

    def _final(self, head, rois, logits, bbox_pred, proposal_ok, img_shape):
        """Step 5: softmax, per-class boxes, score_thr, NMS."""
        s = self.settings
        n, p = rois.shape[0], rois.shape[1]
        prob = logits.softmax(-1)[:, :-1]
        c = prob.shape[1]
        dim = head.bbox_coder.encode_size
        bbox_pred = bbox_pred.reshape(n, p, -1, dim).expand(-1, -1, c, -1)
        priors = rois.unsqueeze(2).expand(-1, -1, c, -1)
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
