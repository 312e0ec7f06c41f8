"""mmdet's dense-head post-processing as torch ops that trace to standard
ONNX: priors, box decoding, score threshold, top-k, class-aware NMS.

:class:`DetectorWithPostprocess` wraps a one-stage detector so that one
forward maps the preprocessed batch to final detections, in PyTorch and, via
``torch.onnx.export``, in one ONNX graph (``NonMaxSuppression``, ``TopK``,
``GatherElements``...; no custom domain). It follows
``BaseDenseHead.predict_by_feat`` step by step:

1. per level: sigmoid scores of every (prior, class) pair, the ``nms_pre``
   best of them (with their priors, box deltas and score factors), those
   above ``score_thr`` kept;
2. the boxes decoded by the head's ``bbox_coder`` and clamped to the
   image (``img_shape``, before padding);
3. scores times the sigmoid of the score factor (centerness: ATSS, FCOS),
   boxes not wider and higher than ``min_bbox_size`` dropped;
4. NMS with one class offset per label (mmcv's ``batched_nms``), the
   ``max_per_img`` best kept.

Shapes are fixed so that the graph needs no data-dependent sizes: every
level yields exactly ``nms_pre`` candidates (rejected ones carry the score
:data:`INVALID`), and the output holds ``max_per_img`` rows per image,
padded with zero boxes, score 0 and label -1.
"""

import math
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .tensor_forward import DetectorTensorForward

# Score of a rejected candidate (below score_thr, too small, padding).
# Valid scores are >= 0, so NMS's score threshold INVALID / 2 drops these.
INVALID = -1.0

# Output names of the end-to-end graph.
OUTPUT_NAMES = ('dets', 'labels')
INPUT_NAMES = ('input', 'img_shape')


class PostprocessError(ValueError):
    """The head or its test_cfg has no in-graph post-processing here."""


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX ``NonMaxSuppression`` (one class), with a PyTorch forward.

    The forward is a plain greedy NMS (torchvision is not a dependency), so
    the wrapped model also runs in PyTorch; the exporter writes the
    :meth:`symbolic` instead. IoU as in mmcv's ``nms`` and onnxruntime:
    intersection over union of (x1, y1, x2, y2) boxes, a box suppressed
    when its IoU with a kept one is strictly above the threshold.
    """

    @staticmethod
    def forward(ctx, boxes, scores, max_per_img, iou_thr, score_thr):
        # boxes (B, M, 4), scores (B, 1, M) -> (S, 3) [batch, 0, box].
        # In numpy: torch ops here would be recorded by the tracer into a
        # subgraph the exporter discards anyway (slowly, one per step).
        all_boxes = boxes.detach().cpu().numpy()
        all_scores = scores.detach().cpu().numpy()
        found = []
        for b in range(all_boxes.shape[0]):
            s = all_scores[b, 0]
            order = np.argsort(-s, kind='stable')
            order = order[s[order] > score_thr]
            box = all_boxes[b, order]
            area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
            kept = []
            alive = np.ones(len(order), dtype=bool)
            for i in range(len(order)):
                if not alive[i]:
                    continue
                kept.append(i)
                if len(kept) == max_per_img:
                    break
                lt = np.maximum(box[i, :2], box[:, :2])
                rb = np.minimum(box[i, 2:], box[:, 2:])
                wh = np.clip(rb - lt, 0, None)
                inter = wh[:, 0] * wh[:, 1]
                union = np.maximum(area[i] + area - inter, 1e-12)
                alive &= ~(inter / union > iou_thr)
            idx = order[np.asarray(kept, dtype=np.int64)]
            found.append(
                np.stack([np.full_like(idx, b), np.zeros_like(idx), idx], 1)
            )
        out = np.concatenate(found) if found else np.zeros((0, 3), np.int64)
        return torch.from_numpy(out.astype(np.int64)).to(boxes.device)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_img, iou_thr, score_thr):
        def const(value, dtype):
            return g.op('Constant', value_t=torch.tensor([value], dtype=dtype))

        return g.op(
            'NonMaxSuppression',
            boxes,
            scores,
            const(max_per_img, torch.long),
            const(iou_thr, torch.float),
            const(score_thr, torch.float),
            center_point_box_i=0,
        )


def end_to_end_module(detector: nn.Module) -> nn.Module:
    """The detector wrapped so that its forward ends in detections.

    Args:
        detector (SingleStageDetector | TwoStageDetector): The model.

    Returns:
        nn.Module: :class:`DetectorWithPostprocess`, or
        :class:`~.two_stage.TwoStageWithPostprocess` for a detector with
        an RPN and RoI head. Both take ``(images, img_shape)`` and return
        ``(dets, labels)`` and have ``settings`` and ``replaced_modules``.
    """
    if hasattr(detector, 'roi_head'):
        from .two_stage import TwoStageWithPostprocess

        return TwoStageWithPostprocess(detector)
    return DetectorWithPostprocess(detector)


def _pad_rows(x: Tensor, rows: int, value: float) -> Tensor:
    """``x`` (B, R, ...) with ``rows`` more rows of ``value`` along dim 1.

    The padding is made from ``x`` itself (a slice times 0), so its batch
    size stays a dynamic dimension in the traced graph.
    """
    pad = x[:, :1] * 0 + value
    return torch.cat([x, pad.expand(-1, rows, *x.shape[2:])], dim=1)


def _priors(head, level: int, h, w, dtype, device) -> Tensor:
    """Level ``level``'s priors for an (h, w) map, in mmdet's order.

    Row (y * w + x) * A + a holds anchor a at (x, y) (``AnchorGenerator``,
    (x1, y1, x2, y2)) or the point (``MlvlPointGenerator``, (x, y)).
    """
    gen = head.prior_generator
    sw, sh = gen.strides[level]
    kw = dict(dtype=dtype, device=device)
    if type(gen).__name__ == 'MlvlPointGenerator':
        xs = (torch.arange(w, **kw) + gen.offset) * sw
        ys = (torch.arange(h, **kw) + gen.offset) * sh
        xx = xs.view(1, -1).expand(h, -1).reshape(-1)
        yy = ys.view(-1, 1).expand(-1, w).reshape(-1)
        return torch.stack([xx, yy], -1)
    base = gen.base_anchors[level].to(**kw)  # (A, 4)
    xs = torch.arange(w, **kw) * sw
    ys = torch.arange(h, **kw) * sh
    xx = xs.view(1, -1).expand(h, -1).reshape(-1)
    yy = ys.view(-1, 1).expand(-1, w).reshape(-1)
    shifts = torch.stack([xx, yy, xx, yy], -1)
    return (shifts[:, None, :] + base[None]).reshape(-1, 4)


def _clamp_to_image(boxes: Tensor, img_shape: Tensor) -> Tensor:
    """Clamp (B, K, 4) boxes to [0, w] x [0, h] of each image's
    ``img_shape`` (B, 2) = (h, w), as mmdet's coders do with max_shape."""
    h = img_shape[:, 0].view(-1, 1)
    w = img_shape[:, 1].view(-1, 1)
    zero = boxes.new_zeros(())
    x1 = torch.minimum(torch.maximum(boxes[..., 0], zero), w)
    y1 = torch.minimum(torch.maximum(boxes[..., 1], zero), h)
    x2 = torch.minimum(torch.maximum(boxes[..., 2], zero), w)
    y2 = torch.minimum(torch.maximum(boxes[..., 3], zero), h)
    return torch.stack([x1, y1, x2, y2], -1)


def _decode(coder, priors: Tensor, pred: Tensor, img_shape: Tensor):
    """Boxes (B, K, 4) from priors (B, K, P) and predictions (B, K, 4).

    The arithmetic of mmdet's ``delta2bbox`` / ``distance2bbox``, in the
    same order (so PyTorch results match to the last bit).
    """
    name = type(coder).__name__
    if name == 'DeltaXYWHBBoxCoder':
        means = pred.new_tensor(coder.means)
        stds = pred.new_tensor(coder.stds)
        d = pred * stds + means
        dxy, dwh = d[..., :2], d[..., 2:]
        pxy = (priors[..., :2] + priors[..., 2:]) * 0.5
        pwh = priors[..., 2:] - priors[..., :2]
        dxy_wh = pwh * dxy
        # The coder's decode() passes wh_ratio_clip = 16 / 1000.
        max_ratio = abs(math.log(16 / 1000))
        if coder.add_ctr_clamp:
            dxy_wh = dxy_wh.clamp(min=-coder.ctr_clamp, max=coder.ctr_clamp)
            dwh = dwh.clamp(max=max_ratio)
        else:
            dwh = dwh.clamp(min=-max_ratio, max=max_ratio)
        gxy = pxy + dxy_wh
        gwh = pwh * dwh.exp()
        boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], -1)
    elif name == 'DistancePointBBoxCoder':
        px, py = priors[..., 0], priors[..., 1]
        boxes = torch.stack(
            [
                px - pred[..., 0],
                py - pred[..., 1],
                px + pred[..., 2],
                py + pred[..., 3],
            ],
            -1,
        )
    else:  # checked in DetectorWithPostprocess.__init__
        raise AssertionError(name)
    if coder.clip_border:
        boxes = _clamp_to_image(boxes, img_shape)
    return boxes


SUPPORTED_CODERS = ('DeltaXYWHBBoxCoder', 'DistancePointBBoxCoder')
SUPPORTED_PRIORS = ('AnchorGenerator', 'MlvlPointGenerator')


def postprocess_settings(detector) -> Dict:
    """The test-time settings the graph bakes in.

    Args:
        detector (SingleStageDetector | TwoStageDetector): The model to
            export; a two-stage one gets
            :func:`~.two_stage.two_stage_settings`.

    Returns:
        dict: See :func:`dense_head_settings` (one-stage) and
        :func:`~.two_stage.two_stage_settings`.
    """
    if not hasattr(detector, 'bbox_head'):
        from .two_stage import two_stage_settings

        return two_stage_settings(detector)
    return dense_head_settings(detector.bbox_head)


def dense_head_settings(head) -> Dict:
    """A dense head's test-time settings (its ``test_cfg``).

    Args:
        head (BaseDenseHead): ATSS, FCOS, RetinaNet, RPN... head.

    Returns:
        dict: ``score_thr``, ``nms_pre``, ``iou_threshold``,
        ``max_per_img``, ``min_bbox_size``, ``class_agnostic``, plus the
        head, prior and coder type names (for the file's metadata).

    Raises:
        PostprocessError: A head, prior generator, box coder or NMS setting
            that :class:`DetectorWithPostprocess` does not reproduce.
    """
    cfg = head.test_cfg
    coder = type(head.bbox_coder).__name__
    prior = type(head.prior_generator).__name__
    way_out = (
        'Export without --postprocess (raw maps, decoded with '
        'mmdet_dyhead.deploy.decode_raw_outputs).'
    )
    if coder not in SUPPORTED_CODERS or prior not in SUPPORTED_PRIORS:
        raise PostprocessError(
            f'{type(head).__name__} uses {prior} and {coder}; the in-graph '
            f'post-processing covers {SUPPORTED_PRIORS} with '
            f'{SUPPORTED_CODERS} (ATSS, FCOS, RetinaNet). {way_out}'
        )
    if getattr(head.loss_cls, 'custom_cls_channels', False):
        raise PostprocessError(
            f'{type(head).__name__} has custom class channels. {way_out}'
        )
    # DyHeadATSSHead can rank the pre-NMS top-k by class x centerness; the
    # graph ranks by the class score (mmdet's rule) only.
    if getattr(head, 'nms_pre_rank', 'cls') != 'cls':
        raise PostprocessError(
            f'{type(head).__name__} ranks the nms_pre candidates by '
            f'{head.nms_pre_rank!r}; the graph ranks by the class score. '
            f'{way_out}'
        )
    nms = dict(cfg.get('nms') or {})
    if nms.get('type', 'nms') != 'nms' or cfg.get('max_per_img') is None:
        raise PostprocessError(
            f'test_cfg.nms {nms} / max_per_img {cfg.get("max_per_img")}: '
            f"the graph has plain NMS (type='nms') and a fixed "
            f'max_per_img. {way_out}'
        )
    nms_pre = int(cfg.get('nms_pre', -1))
    return dict(
        head=type(head).__name__,
        prior_generator=prior,
        bbox_coder=coder,
        score_thr=float(cfg.get('score_thr', 0.0)),
        nms_pre=nms_pre,
        iou_threshold=float(nms['iou_threshold']),
        class_agnostic=bool(nms.get('class_agnostic', False)),
        max_per_img=int(cfg['max_per_img']),
        min_bbox_size=float(cfg.get('min_bbox_size', -1)),
    )


class DetectorWithPostprocess(nn.Module):
    """A one-stage detector whose forward ends in final detections.

    Args:
        detector (SingleStageDetector): ATSS, FCOS, RetinaNet or another
            dense head with an ``AnchorGenerator`` or ``MlvlPointGenerator``
            and a ``DeltaXYWHBBoxCoder`` or ``DistancePointBBoxCoder``;
            settings from ``bbox_head.test_cfg`` (see
            :func:`postprocess_settings`).

    Shapes:
        images: (N, 3, H, W) preprocessed batch (as for the raw export).
        img_shape: (N, 2) float, each image's (height, width) inside the
        padded batch (mmdet's ``img_shape``); boxes are clamped to it.
        Returns ``dets`` (N, K, 5) (x1, y1, x2, y2, score) in input pixels
        and ``labels`` (N, K) int64, K = ``max_per_img``, best first;
        unused rows are zeros with label -1.

    Note:
        ``min_bbox_size`` is applied to boxes in input pixels; mmdet applies
        it after rescaling to the original image. The two agree for the
        usual value 0 (any positive width and height).
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.tensor_forward = DetectorTensorForward(detector)
        self.settings = postprocess_settings(detector)
        self.head = detector.bbox_head
        # Modules the graph writes in its own way (none here).
        self.replaced_modules = ()

    def forward(self, images: Tensor, img_shape: Tensor):
        groups = self.tensor_forward(images)
        n = self.tensor_forward.num_levels
        cls_scores = groups[:n]
        bbox_preds = groups[n : 2 * n]
        factors = groups[2 * n : 3 * n] if len(groups) == 3 * n else None
        return self.postprocess(cls_scores, bbox_preds, factors, img_shape)

    def postprocess(
        self,
        cls_scores: List[Tensor],
        bbox_preds: List[Tensor],
        score_factors,
        img_shape: Tensor,
    ) -> Tuple[Tensor, Tensor]:
        """Raw head outputs -> ``(dets, labels)`` (see the class Shapes).

        Args:
            cls_scores (list[Tensor]): Per level (N, A * C, H_l, W_l).
            bbox_preds (list[Tensor]): Per level (N, A * 4, H_l, W_l).
            score_factors (list[Tensor], optional): Per level
                (N, A, H_l, W_l) logits (centerness), or None.
            img_shape (Tensor): (N, 2) float (height, width).
        """
        boxes, scores, labels = dense_candidates(
            self.head,
            self.settings,
            cls_scores,
            bbox_preds,
            score_factors,
            img_shape,
        )
        return nms_topk(boxes, scores, labels, self.settings)


def dense_candidates(
    head,
    settings: Dict,
    cls_scores: List[Tensor],
    bbox_preds: List[Tensor],
    score_factors,
    img_shape: Tensor,
    group_by_level: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Steps 1-3 of the module docstring: a dense head's scored, decoded
    candidates, ``nms_pre`` per level.

    Args:
        head (BaseDenseHead): The head (priors, coder, sigmoid or softmax).
        settings (dict): :func:`postprocess_settings` of the head.
        cls_scores, bbox_preds, score_factors, img_shape: See
            :meth:`DetectorWithPostprocess.postprocess`.
        group_by_level (bool): Return each candidate's pyramid level instead
            of its class as the NMS group (mmdet's ``RPNHead`` runs NMS per
            level).

    Returns:
        tuple[Tensor]: ``boxes`` (N, M, 4), ``scores`` (N, M) with
        :data:`INVALID` for rejected candidates, ``labels`` (N, M) int64.
    """
    s = settings
    num_classes = head.cls_out_channels
    img_shape = img_shape.to(cls_scores[0].dtype)
    boxes, scores, labels = [], [], []
    for lvl, (cls, pred) in enumerate(zip(cls_scores, bbox_preds)):
        h, w = cls.shape[2], cls.shape[3]
        priors = _priors(head, lvl, h, w, cls.dtype, cls.device)
        cls = cls.permute(0, 2, 3, 1).reshape(cls.shape[0], -1, num_classes)
        if head.use_sigmoid_cls:
            prob = cls.sigmoid()
        else:  # the last channel is the background
            prob = cls.softmax(-1)[..., :-1]
        classes = prob.shape[2]
        dim = head.bbox_coder.encode_size
        pred = pred.permute(0, 2, 3, 1).reshape(pred.shape[0], -1, dim)
        if s['nms_pre'] > 0:
            k = s['nms_pre']
            # Rows of INVALID scores so that every level has at least
            # k (prior, class) pairs: TopK gets a constant k.
            rows = -(-k // classes)
            prob = _pad_rows(prob, rows, INVALID)
            pred = _pad_rows(pred, rows, 0.0)
            priors = torch.cat([priors, priors[:1].expand(rows, -1) * 0], 0)
            top, idx = prob.reshape(prob.shape[0], -1).topk(k, dim=1)
        else:  # nms_pre -1: every pair
            top, idx = prob.reshape(prob.shape[0], -1).sort(
                dim=1, descending=True
            )
        anchor = torch.div(idx, classes, rounding_mode='floor')
        label = idx - anchor * classes
        if group_by_level:
            label = label * 0 + lvl
        sel_pred = torch.gather(
            pred, 1, anchor.unsqueeze(-1).expand(-1, -1, dim)
        )
        sel_priors = priors[anchor]
        box = _decode(head.bbox_coder, sel_priors, sel_pred, img_shape)
        valid = top > s['score_thr']
        score = top
        if score_factors is not None:
            f = score_factors[lvl]
            f = f.permute(0, 2, 3, 1).reshape(f.shape[0], -1).sigmoid()
            if s['nms_pre'] > 0:
                f = _pad_rows(f, rows, 1.0)
            score = score * torch.gather(f, 1, anchor)
        if s['min_bbox_size'] >= 0:
            m = s['min_bbox_size']
            valid = (
                valid
                & (box[..., 2] - box[..., 0] > m)
                & (box[..., 3] - box[..., 1] > m)
            )
        boxes.append(box)
        scores.append(torch.where(valid, score, score.new_tensor(INVALID)))
        labels.append(label)
    return torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(labels, 1)


def nms_topk(
    boxes: Tensor, scores: Tensor, labels: Tensor, settings: Dict
) -> Tuple[Tensor, Tensor]:
    """Step 4: NMS per label (mmcv's ``batched_nms``), the best
    ``max_per_img`` kept, padded.

    Args:
        boxes (Tensor): (N, M, 4) candidates.
        scores (Tensor): (N, M), :data:`INVALID` for rejected ones.
        labels (Tensor): (N, M) int64 NMS groups (classes, or levels).
        settings (dict): ``iou_threshold``, ``class_agnostic``,
            ``max_per_img``.

    Returns:
        tuple[Tensor]: ``dets`` (N, K, 5) and ``labels`` (N, K), K =
        ``max_per_img``, best first, unused rows zeros with label -1.
    """
    s = settings
    valid = scores > INVALID / 2
    nms_boxes = boxes
    if not s['class_agnostic']:
        # mmcv's batched_nms: shift each class by (max coordinate + 1)
        # so that boxes of different classes never overlap.
        top = torch.where(valid.unsqueeze(-1), boxes, boxes.new_zeros(()))
        top = top.reshape(top.shape[0], -1).max(dim=1).values
        offsets = labels.to(boxes.dtype) * (top.view(-1, 1) + 1)
        nms_boxes = boxes + offsets.unsqueeze(-1)
    k = s['max_per_img']
    selected = _NonMaxSuppression.apply(
        nms_boxes,
        scores.unsqueeze(1),
        k,
        s['iou_threshold'],
        INVALID / 2,
    )
    keep = torch.zeros_like(scores)
    keep[selected[:, 0], selected[:, 2]] = 1.0
    final = torch.where(keep > 0, scores, scores.new_tensor(INVALID))
    # k rows of padding: TopK needs k <= M, and M may be below k.
    final = _pad_rows(final, k, INVALID)
    boxes = _pad_rows(boxes, k, 0.0)
    labels = _pad_rows(labels, k, -1)
    top, idx = final.topk(k, dim=1)
    found = top > INVALID / 2
    out_boxes = torch.gather(boxes, 1, idx.unsqueeze(-1).expand(-1, -1, 4))
    out_boxes = torch.where(
        found.unsqueeze(-1), out_boxes, out_boxes.new_zeros(())
    )
    out_scores = torch.where(found, top, top.new_zeros(()))
    out_labels = torch.where(
        found, torch.gather(labels, 1, idx), labels.new_full((), -1)
    )
    dets = torch.cat([out_boxes, out_scores.unsqueeze(-1)], -1)
    return dets, out_labels
