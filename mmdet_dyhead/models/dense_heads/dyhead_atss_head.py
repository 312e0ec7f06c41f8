"""mmdet's ATSS head with the DyHead release's pre-NMS ranking as an option.

microsoft/DynamicHead's ATSS inference (``extra/atss.py``), per level and
image: keep the (location, class) pairs whose class probability exceeds the
score threshold, multiply each by the location's centerness probability
(no square root), keep the ``nms_pre`` largest *products*, and pass the
products to NMS. mmdet's ``ATSSHead`` keeps the ``nms_pre`` largest class
probabilities and multiplies by centerness afterwards, so a location with a
high class score and a low centerness can take a slot that the release
gives to a better-centred one. The final scores (class x centerness) and
everything after the top-k (decoding, rescaling, NMS) are the same.
"""

import copy
from typing import List

import torch
from mmdet.models.dense_heads import ATSSHead
from mmdet.structures.bbox import cat_boxes
from mmengine.config import ConfigDict
from mmengine.structures import InstanceData
from torch import Tensor

from mmdet_dyhead.registry import MODELS

NMS_PRE_RANKS = ('cls', 'cls_x_centerness')


@MODELS.register_module()
class DyHeadATSSHead(ATSSHead):
    """:class:`mmdet.models.ATSSHead` with a choice of pre-NMS ranking.

    Layers, weights (state-dict keys), targets and losses are mmdet's; only
    test-time post-processing can differ.

    Args:
        nms_pre_rank (str): What ranks the candidates of a level before the
            top ``test_cfg.nms_pre`` are kept. ``'cls'`` (default): the
            class probability, as mmdet's ``ATSSHead`` (results are
            bit-identical to it). ``'cls_x_centerness'``: class probability
            x centerness probability, as the microsoft/DynamicHead release;
            the ``score_thr`` filter still applies to the class probability
            alone, as there.
        **kwargs: Everything else of :class:`mmdet.models.ATSSHead`.
    """

    def __init__(self, *args, nms_pre_rank: str = 'cls', **kwargs) -> None:
        if nms_pre_rank not in NMS_PRE_RANKS:
            raise ValueError(
                f'nms_pre_rank must be one of {NMS_PRE_RANKS}, got '
                f'{nms_pre_rank!r}'
            )
        super().__init__(*args, **kwargs)
        self.nms_pre_rank = nms_pre_rank

    def _predict_by_feat_single(
        self,
        cls_score_list: List[Tensor],
        bbox_pred_list: List[Tensor],
        score_factor_list: List[Tensor],
        mlvl_priors: List[Tensor],
        img_meta: dict,
        cfg: ConfigDict,
        rescale: bool = False,
        with_nms: bool = True,
    ) -> InstanceData:
        """One image's detections; see mmdet's ``BaseDenseHead``.

        Args:
            cls_score_list (list[Tensor]): Class logits per level, each
                (num_priors * num_classes, H, W).
            bbox_pred_list (list[Tensor]): Box deltas per level, each
                (num_priors * 4, H, W).
            score_factor_list (list[Tensor]): Centerness logits per level,
                each (num_priors, H, W).
            mlvl_priors (list[Tensor]): Anchors per level, (num_priors, 4).
            img_meta (dict): Image meta information.
            cfg (ConfigDict): Test config; ``self.test_cfg`` when None.
            rescale (bool): Boxes in the original image's scale.
            with_nms (bool): Run NMS (False for test-time augmentation).

        Returns:
            InstanceData: ``bboxes``, ``scores`` and ``labels``.
        """
        if self.nms_pre_rank == 'cls':
            return super()._predict_by_feat_single(
                cls_score_list,
                bbox_pred_list,
                score_factor_list,
                mlvl_priors,
                img_meta,
                cfg,
                rescale=rescale,
                with_nms=with_nms,
            )
        cfg = copy.deepcopy(self.test_cfg if cfg is None else cfg)
        nms_pre = cfg.get('nms_pre', -1)
        score_thr = cfg.get('score_thr', 0)
        kept = dict(deltas=[], priors=[], cls=[], ctr=[], labels=[])
        for cls_score, bbox_pred, centerness, priors in zip(
            cls_score_list, bbox_pred_list, score_factor_list, mlvl_priors
        ):
            deltas = bbox_pred.permute(1, 2, 0).reshape(
                -1, self.bbox_coder.encode_size
            )
            ctr = centerness.permute(1, 2, 0).reshape(-1).sigmoid()
            logits = cls_score.permute(1, 2, 0).reshape(
                -1, self.cls_out_channels
            )
            if self.use_sigmoid_cls:
                probs = logits.sigmoid()
            else:  # background is the last column there
                probs = logits.softmax(-1)[:, :-1]
            # Candidates by class probability, ranked by the product.
            pairs = torch.nonzero(probs > score_thr)
            products = probs[pairs[:, 0], pairs[:, 1]] * ctr[pairs[:, 0]]
            k = pairs.size(0) if nms_pre <= 0 else min(nms_pre, pairs.size(0))
            order = products.sort(descending=True)[1][:k]
            locs, labels = pairs[order].unbind(dim=1)
            kept['deltas'].append(deltas[locs])
            kept['priors'].append(priors[locs])
            kept['cls'].append(probs[locs, labels])
            kept['ctr'].append(ctr[locs])
            kept['labels'].append(labels)

        results = InstanceData()
        results.bboxes = self.bbox_coder.decode(
            cat_boxes(kept['priors']),
            torch.cat(kept['deltas']),
            max_shape=img_meta['img_shape'],
        )
        # mmdet's post-processing multiplies scores by score_factors, which
        # gives the same products the ranking used.
        results.scores = torch.cat(kept['cls'])
        results.score_factors = torch.cat(kept['ctr'])
        results.labels = torch.cat(kept['labels'])
        return self._bbox_post_process(
            results=results,
            cfg=cfg,
            rescale=rescale,
            with_nms=with_nms,
            img_meta=img_meta,
        )
