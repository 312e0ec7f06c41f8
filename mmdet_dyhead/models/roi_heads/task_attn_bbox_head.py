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
    read the result. Targets, losses and post-processing are mmdet's.

    It takes the arguments of mmdet's ``Shared2FCBBoxHead`` and
    ``ConvFCBBoxHead``, so that changing only ``type`` in a two-stage config
    builds. What they mean here:

    - ``in_channels``, ``roi_feat_size``, ``with_avg_pool`` and the rest of
      :class:`BBoxHead`: as in mmdet (C and S of the RoI features).
    - ``num_shared_fcs``: the shared FC layers that the attentions replace,
      one attention each; the same number as ``num_task_attn``.
    - ``fc_out_channels``: width of the representation the classifier and
      regressor read. ``None`` (the package's configs, Fig. 2c as drawn):
      the attended RoI itself, ``in_channels * roi_feat_size**2`` values
      (``in_channels`` with ``with_avg_pool``). An integer (mmdet's configs
      pass 1024) adds one FC + ReLU of that width after the attentions.
    - Conv layers and separate branches (``num_shared_convs``,
      ``num_cls_convs``, ``num_reg_convs``, ``num_cls_fcs``,
      ``num_reg_fcs`` above 0, ``conv_out_channels``, ``conv_cfg``,
      ``norm_cfg``): this head has none; anything but the defaults raises
      a ``ValueError`` that names the argument.

    Args:
        num_task_attn (int, optional): Stacked task-aware attentions (>= 1).
            None: ``num_shared_fcs`` if given, else 2.
        task_attn_ratio (int): Squeeze ratio of each attention's first FC.
            Default: 4.
        hsigmoid (str): ``'official'`` or ``'paper'`` hard sigmoid, see
            :class:`TaskAwareAttention`.
        fc_out_channels (int, optional): Width of the FC layer between the
            attentions and the predictors; None for no such layer.
            Default: None.
        num_shared_fcs (int, optional): ``ConvFCBBoxHead``'s name for
            ``num_task_attn``; give either, or both with the same value.
        num_shared_convs, num_cls_convs, num_cls_fcs, num_reg_convs,
            num_reg_fcs (int): Must be 0 (no conv tower, no separate
            branches).
        conv_out_channels (int, optional), conv_cfg (dict, optional),
            norm_cfg (dict, optional): Settings of conv layers; must be
            None (not given).
        with_avg_pool (bool): Average-pool the RoI before the predictors.
            Default False: box regression needs the spatial layout.
        init_cfg (dict or list[dict], optional): Initialization config.
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
        num_task_attn: Optional[int] = None,
        task_attn_ratio: int = 4,
        hsigmoid: str = 'official',
        fc_out_channels: Optional[int] = None,
        num_shared_fcs: Optional[int] = None,
        num_shared_convs: int = 0,
        num_cls_convs: int = 0,
        num_cls_fcs: int = 0,
        num_reg_convs: int = 0,
        num_reg_fcs: int = 0,
        conv_out_channels: Optional[int] = None,
        conv_cfg: Optional[dict] = None,
        norm_cfg: Optional[dict] = None,
        with_avg_pool: bool = False,
        init_cfg: Optional[dict] = None,
        **kwargs,
    ) -> None:
        # Before BBoxHead builds anything: a setting this head cannot honour
        # is reported as such, not as a shape error later.
        num_task_attn = _check_drop_in_arguments(
            num_task_attn,
            num_shared_fcs,
            fc_out_channels,
            dict(
                num_shared_convs=num_shared_convs,
                num_cls_convs=num_cls_convs,
                num_cls_fcs=num_cls_fcs,
                num_reg_convs=num_reg_convs,
                num_reg_fcs=num_reg_fcs,
            ),
            dict(
                conv_out_channels=conv_out_channels,
                conv_cfg=conv_cfg,
                norm_cfg=norm_cfg,
            ),
        )
        super().__init__(
            with_avg_pool=with_avg_pool, init_cfg=init_cfg, **kwargs
        )
        if self.in_channels % task_attn_ratio:
            raise ValueError(
                f'in_channels={self.in_channels} is not divisible by '
                f'task_attn_ratio={task_attn_ratio}; pick a ratio that '
                f'divides the RoI feature channels.'
            )
        self.num_task_attn = num_task_attn
        self.fc_out_channels = fc_out_channels
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

        self.out_fc = None
        if fc_out_channels is not None:
            roi_dim = self.in_channels
            if not self.with_avg_pool:
                roi_dim *= self.roi_feat_area
            self.out_fc = nn.Linear(roi_dim, fc_out_channels)
            self.relu = nn.ReLU(inplace=True)
            self._rebuild_predictors(fc_out_channels)
            if init_cfg is None:
                # BBoxHead set the predictors' init; ConvFCBBoxHead's for
                # its FC layers.
                self.init_cfg += [
                    dict(
                        type='Xavier',
                        distribution='uniform',
                        override=dict(name='out_fc'),
                    )
                ]

    def _rebuild_predictors(self, in_features: int) -> None:
        """fc_cls and fc_reg as BBoxHead builds them, reading
        ``in_features`` values instead of the pooled RoI."""
        if self.with_cls:
            if self.custom_cls_channels:
                cls_channels = self.loss_cls.get_cls_channels(self.num_classes)
            else:
                cls_channels = self.num_classes + 1
            self.fc_cls = MODELS.build(
                dict(
                    self.cls_predictor_cfg,
                    in_features=in_features,
                    out_features=cls_channels,
                )
            )
        if self.with_reg:
            box_dim = self.bbox_coder.encode_size
            self.fc_reg = MODELS.build(
                dict(
                    self.reg_predictor_cfg,
                    in_features=in_features,
                    out_features=box_dim
                    if self.reg_class_agnostic
                    else box_dim * self.num_classes,
                )
            )

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
        if self.with_avg_pool:
            # AvgPool2d refuses zero RoIs; the mean is the same pooling.
            x = self.avg_pool(x) if x.numel() else x.mean(dim=(2, 3))
        x = x.flatten(1)
        if self.out_fc is not None:
            x = self.relu(self.out_fc(x))
        cls_score = self.fc_cls(x) if self.with_cls else None
        bbox_pred = self.fc_reg(x) if self.with_reg else None
        return cls_score, bbox_pred


def _check_drop_in_arguments(
    num_task_attn, num_shared_fcs, fc_out_channels, layer_counts, conv_args
) -> int:
    """Validate the ConvFCBBoxHead arguments; return ``num_task_attn``."""
    where = 'model.roi_head.bbox_head'
    if num_task_attn is None:
        num_task_attn = 2 if num_shared_fcs is None else num_shared_fcs
    elif num_shared_fcs is not None and num_shared_fcs != num_task_attn:
        raise ValueError(
            f'num_shared_fcs={num_shared_fcs} and num_task_attn='
            f'{num_task_attn} disagree: TaskAttnBBoxHead puts one task-aware '
            f'attention where each shared FC was. Give only one of them in '
            f'{where}.'
        )
    if (
        not isinstance(num_task_attn, int)
        or isinstance(num_task_attn, bool)
        or num_task_attn < 1
    ):
        raise ValueError(
            f'num_task_attn must be an integer >= 1, got {num_task_attn!r} '
            f"(num_shared_fcs={num_shared_fcs!r}); use mmdet's BBoxHead for "
            f'a head without hidden layers.'
        )
    if fc_out_channels is not None and (
        not isinstance(fc_out_channels, int)
        or isinstance(fc_out_channels, bool)
        or fc_out_channels < 1
    ):
        raise ValueError(
            f'fc_out_channels must be a positive integer or None, got '
            f'{fc_out_channels!r}; None lets the predictors read the '
            f"attended RoI directly (the paper's Fig. 2c)."
        )
    for name, value in layer_counts.items():
        if value != 0:
            raise ValueError(
                f'{name}={value} is not supported: TaskAttnBBoxHead has no '
                f'conv tower and no separate classification or regression '
                f'branch (task-aware attention replaces the shared FC '
                f'layers). Remove {name} from {where} (or set it to 0), or '
                f"keep mmdet's ConvFCBBoxHead / Shared4Conv1FCBBoxHead."
            )
    given = [name for name, value in conv_args.items() if value is not None]
    if given:
        settings = ', '.join(f'{n}={conv_args[n]!r}' for n in given)
        raise ValueError(
            f'{settings} is not supported: these settings configure conv '
            f'layers and TaskAttnBBoxHead has none. Remove '
            f'{" and ".join(given)} from {where}.'
        )
    return num_task_attn
