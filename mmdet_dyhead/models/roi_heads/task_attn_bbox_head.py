"""RoI box head with task-aware attention as hidden layers (Fig. 2c)."""

from typing import Optional

import torch.nn as nn
from mmdet.models.roi_heads.bbox_heads import BBoxHead
from mmengine.model import normal_init
from torch import Tensor

from mmdet_dyhead.registry import MODELS

from ..layers import TaskAwareAttention


@MODELS.register_module()
class TaskAttnBBoxHead(BBoxHead):
    """Box head of the two-stage DyHead (Figure 2c).

    The paper applies the scale- and spatial-aware attentions to the pyramid
    before RoI pooling (``DyHeadNeck(use_task_attn=False)``) and replaces the
    fully connected layers of the RoI head with task-aware attention
    (Eq. 5). Here ``num_task_attn`` task-aware attentions (two by default,
    one per FC of mmdet's ``Shared2FCBBoxHead``) act on the pooled RoI
    features, and the classifier and box regressor of :class:`BBoxHead`
    read the flattened result. Targets, losses and post-processing are
    mmdet's.

    Args:
        num_task_attn (int): Stacked task-aware attentions (>= 1).
            Default: 2.
        task_attn_ratio (int): Squeeze ratio of each attention's first FC.
            Default: 4.
        hsigmoid (str): ``'official'`` or ``'paper'`` hard sigmoid, see
            :class:`TaskAwareAttention`.
        with_avg_pool (bool): Average-pool the RoI before the predictors.
            Default False: box regression needs the spatial layout.
        **kwargs: Everything else of :class:`mmdet.models.BBoxHead`
            (``in_channels``, ``roi_feat_size``, ``num_classes``,
            ``bbox_coder``, ``loss_cls``, ``loss_bbox``, ...).

    Shapes:
        input: RoI features (R, C, S, S) with C = ``in_channels`` and
        S = ``roi_feat_size``;
        output: ``cls_score`` (R, num_classes + 1) and ``bbox_pred``
        (R, 4 * num_classes), or (R, 4) if ``reg_class_agnostic``.
    """

    def __init__(
        self,
        num_task_attn: int = 2,
        task_attn_ratio: int = 4,
        hsigmoid: str = 'official',
        with_avg_pool: bool = False,
        init_cfg: Optional[dict] = None,
        **kwargs,
    ) -> None:
        super().__init__(
            with_avg_pool=with_avg_pool, init_cfg=init_cfg, **kwargs
        )
        if not isinstance(num_task_attn, int) or num_task_attn < 1:
            raise ValueError(
                f'num_task_attn must be an integer >= 1, got '
                f"{num_task_attn!r}; use mmdet's BBoxHead for a head "
                f'without hidden layers.'
            )
        if self.in_channels % task_attn_ratio:
            raise ValueError(
                f'in_channels={self.in_channels} is not divisible by '
                f'task_attn_ratio={task_attn_ratio}; pick a ratio that '
                f'divides the RoI feature channels.'
            )
        self.num_task_attn = num_task_attn
        self.task_attns = nn.ModuleList(
            [
                TaskAwareAttention(self.in_channels, task_attn_ratio, hsigmoid)
                for _ in range(num_task_attn)
            ]
        )
        # Small FC weights start every attention near a plain ReLU (the
        # mmdet DyHead init); done here because TaskAwareAttention is a
        # plain nn.Module that init_weights() does not visit.
        for attn in self.task_attns:
            normal_init(attn.fc1, 0, 0.01)
            normal_init(attn.fc2, 0, 0.01)

    def forward(self, x: Tensor) -> tuple:
        """Args: x: RoI features (R, C, S, S).

        Returns: tuple ``(cls_score, bbox_pred)``, see the class docstring.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f'TaskAttnBBoxHead expects RoI features (R, {self.in_channels}'
                f', S, S), got {tuple(x.shape)}; set bbox_head.in_channels to '
                f'the RoI extractor out_channels.'
            )
        for attn in self.task_attns:
            x = attn(x)
        if not self.with_avg_pool:
            # mmdet's BBoxHead leaves flattening to the FC heads it replaces.
            x = x.flatten(1)
        return super().forward(x)
