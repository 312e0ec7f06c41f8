"""One DyHead block: pi_C(pi_S(pi_L(F))) (paper Eq. 2, Figure 2a)."""

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from mmengine.logging import print_log
from mmengine.model import BaseModule, constant_init, normal_init
from torch import Tensor

from mmdet_dyhead.utils.misc import check_choice

from ..key_mapping import rename_mmdet_keys
from .hard_sigmoid import check_hsigmoid_style
from .scale_attention import ScaleAwareAttention
from .spatial_attention import SpatialAwareAttention
from .task_attention import TaskAwareAttention

ATTENTION_ORDERS = ('spatial_first', 'scale_first')
INIT_STYLES = ('mmdet', 'official')


class BlockAttention(NamedTuple):
    """What one block computed on the way to its outputs (for plots).

    Attributes:
        inputs (list[Tensor]): The L maps the block read,
            (N, C_in, H_l, W_l).
        outputs (list[Tensor]): The L maps it returned, (N, C_out, H_l, W_l).
        scale_weights (dict[tuple[int, int], Tensor]): pi_L's weight
            (Eq. 3) of every fused term, keyed (output level, source level),
            each (N, 1, 1, 1), before the 1/T average. Empty without pi_L.
        task_coefficients (list[tuple[Tensor, ...]]): Per output level,
            pi_C's ``(a1, b1, a2, b2)`` (Eq. 5), each (N, C_out, 1, 1).
            Empty without pi_C.
    """

    inputs: List[Tensor]
    outputs: List[Tensor]
    scale_weights: Dict[Tuple[int, int], Tensor]
    task_coefficients: List[Tuple[Tensor, Tensor, Tensor, Tensor]]


class DynamicHeadBlock(BaseModule):
    """A DyHead block on an L-level pyramid; every attention can be switched
    off.

    Per output level l (Eq. 2, nested as in Figure 2a)::

        terms   = pi_S(F)[l]               # mid / low / high branches, Eq. 4
        fused   = mean_t  w_t * terms[t]    # scale-aware weights, Eq. 3
        out[l]  = pi_C(fused)               # task-aware attention, Eq. 5

    ``attention_order`` picks where the scale weight ``w_t`` comes from:

    - ``'spatial_first'`` (released code, mmdet): from each branch output,
      i.e. after the DCN; one pooling per term.
    - ``'scale_first'`` (Eq. 2 order, pi_L before pi_S): from the input level
      the term was read from, once per level and reused by the up to three
      terms that read it. The weight is applied after the branch norm: a
      scalar applied before DCN + GroupNorm would be normalised away.

    :meth:`forward_with_attention` returns the outputs together with the
    weights and coefficients above (:class:`BlockAttention`); ``forward``
    runs it and, when the ``record_attention`` attribute is True, keeps that
    record in ``last_attention`` (attention plots, see
    :mod:`mmdet_dyhead.visualization`).

    Args:
        in_channels (int): Channels of the input levels.
        out_channels (int): Channels of the output levels.
        use_scale_attn (bool): pi_L on (Table 1 "L").
        use_spatial_attn (bool): pi_S on (Table 1 "S"); off = plain 3x3 convs.
        use_task_attn (bool): pi_C on (Table 1 "C"); off = identity.
        attention_order (str): ``'spatial_first'`` or ``'scale_first'``.
        hsigmoid (str): ``'official'`` relu6(x+3)/6 after ReLU, or ``'paper'``
            max(0, min(1, (x+1)/2)); used by pi_L and pi_C.
        offset_mode (str): ``'legacy'`` or ``'aligned'``, see
            :class:`SpatialAwareAttention`.
        dcn_bias (bool): Bias in the branch convs (official: True).
        dcn_backend (str): ``'auto'|'mmcv'|'torch'``.
        zero_init_offset (bool): Start the offset/mask conv at zero.
        init_style (str): ``'mmdet'``: N(0, 0.01) for the offset conv and the
            attention FCs; ``'official'``: PyTorch's defaults for them (what
            the released code ends up with), N(0, 0.01) for pi_L's FC.
        norm_cfg (dict | None): Norm after each branch conv. Default GN(16).
        task_attn_ratio (int): Squeeze ratio of pi_C. Default: 4.
        init_cfg (dict, optional): mmengine init config.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        use_scale_attn: bool = True,
        use_spatial_attn: bool = True,
        use_task_attn: bool = True,
        attention_order: str = 'spatial_first',
        hsigmoid: str = 'official',
        offset_mode: str = 'legacy',
        dcn_bias: bool = False,
        dcn_backend: str = 'auto',
        zero_init_offset: bool = True,
        init_style: str = 'mmdet',
        norm_cfg: Optional[dict] = dict(
            type='GN', num_groups=16, requires_grad=True
        ),
        task_attn_ratio: int = 4,
        init_cfg: Optional[dict] = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        check_choice('attention_order', attention_order, ATTENTION_ORDERS)
        check_choice('init_style', init_style, INIT_STYLES)
        check_hsigmoid_style(hsigmoid)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.attention_order = attention_order
        self.spatial_attn = SpatialAwareAttention(
            in_channels,
            out_channels,
            deformable=use_spatial_attn,
            offset_mode=offset_mode,
            dcn_bias=dcn_bias,
            norm_cfg=norm_cfg,
            dcn_backend=dcn_backend,
        )
        self.scale_attn = None
        if use_scale_attn:
            scale_channels = (
                in_channels
                if attention_order == 'scale_first'
                else out_channels
            )
            self.scale_attn = ScaleAwareAttention(scale_channels, hsigmoid)
        self.task_attn = (
            TaskAwareAttention(out_channels, task_attn_ratio, hsigmoid)
            if use_task_attn
            else None
        )
        self._init_weights(zero_init_offset, init_style)
        # The recording switch (see forward); off, nothing is kept.
        self.record_attention = False
        self.last_attention: Optional[BlockAttention] = None

    def _init_weights(self, zero_init_offset: bool, init_style: str) -> None:
        offset_conv = getattr(self.spatial_attn, 'offset_conv', None)
        if self.scale_attn is not None:
            normal_init(self.scale_attn.fc, 0, 0.01)
        if init_style == 'mmdet':
            for m in (
                offset_conv,
                *(
                    (self.task_attn.fc1, self.task_attn.fc2)
                    if self.task_attn
                    else ()
                ),
            ):
                if m is not None:
                    normal_init(m, 0, 0.01)
        if zero_init_offset and offset_conv is not None:
            constant_init(offset_conv, 0)

    def forward(self, feats: Sequence[Tensor]) -> List[Tensor]:
        """Args: feats: L tensors (N, C_in, H_l, W_l), level l+1 half of l.

        Returns: L tensors (N, C_out, H_l, W_l).

        With ``record_attention`` set to True, each call also keeps its
        :class:`BlockAttention` in ``last_attention`` (the outputs are the
        same either way: both come from :meth:`forward_with_attention`).
        """
        outs, attention = self.forward_with_attention(feats)
        if self.record_attention:
            self.last_attention = attention
        return outs

    def forward_with_attention(
        self, feats: Sequence[Tensor]
    ) -> Tuple[List[Tensor], BlockAttention]:
        """The block's outputs and the attentions that produced them.

        Args:
            feats (Sequence[Tensor]): L maps (N, C_in, H_l, W_l).

        Returns:
            tuple: L maps (N, C_out, H_l, W_l), and a :class:`BlockAttention`
            holding references to what was computed (nothing is copied).
        """
        spatial = self.spatial_attn
        level_weights = None
        if (
            self.scale_attn is not None
            and self.attention_order == 'scale_first'
        ):
            level_weights = [self.scale_attn(f) for f in feats]
        offsets = masks = None
        if spatial.deformable:
            offsets, masks = zip(
                *[spatial.offsets_and_masks(f) for f in feats]
            )
        attention = BlockAttention(list(feats), [], {}, [])
        for level, terms in enumerate(spatial(feats, offsets, masks)):
            attention.outputs.append(
                self._fuse(level, terms, level_weights, attention)
            )
        return attention.outputs, attention

    def _fuse(self, level, terms, level_weights, attention) -> Tensor:
        """mean_t w_t * term_t, then pi_C, for one output level.

        In 'spatial_first' order the scale attention pools every term; the
        task attention's pooling of the fused map is then the same weighted
        mean of those pooled vectors (the mean is linear), so no pass over
        the fused map is spent on it. Scalars w_t / T are folded before the
        multiply and the sum is accumulated in place (addcmul_ on a fresh
        tensor whose old value no backward needs). The weights and pi_C's
        coefficients go into ``attention``.
        """
        inv = 1.0 / len(terms)
        pooled_terms = None
        coeffs = [None] * len(terms)
        if self.scale_attn is not None:
            if level_weights is not None:
                weights = [level_weights[src] for src, _ in terms]
            else:
                pooled_terms = [
                    term.mean(dim=(2, 3), keepdim=True) for _, term in terms
                ]
                weights = [
                    self.scale_attn.from_pooled(p) for p in pooled_terms
                ]
            for (src, _), w in zip(terms, weights):
                attention.scale_weights[(level, src)] = w
            coeffs = [w * inv for w in weights]
        fused = pooled = None
        for i, ((_, term), coef) in enumerate(zip(terms, coeffs)):
            if coef is None:
                fused = (
                    term * inv
                    if fused is None
                    else fused.add_(term, alpha=inv)
                )
            else:
                fused = (
                    term * coef
                    if fused is None
                    else fused.addcmul_(term, coef)
                )
            if pooled_terms is not None:
                part = pooled_terms[i] * coef
                pooled = part if pooled is None else pooled + part
        if self.task_attn is None:
            return fused
        if pooled is None:
            pooled = fused.mean(dim=(2, 3), keepdim=True)
        coefficients = self.task_attn.coefficients_from_pooled(pooled)
        attention.task_coefficients.append(coefficients)
        return self.task_attn.apply_coefficients(fused, *coefficients)

    def _load_from_state_dict(
        self,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ):
        # Checkpoints of mmdet's DyHead (and the mmdet model zoo) name the
        # block's parts differently; rename them in place, see key_mapping.
        if rename_mmdet_keys(state_dict, prefix):
            if prefix.endswith('dyhead_blocks.0.'):
                print_log(
                    'Loading mmdet DyHead keys into DyHeadNeck '
                    '(renamed with mmdet_dyhead.models.key_mapping).',
                    logger='current',
                )
        super()._load_from_state_dict(
            state_dict,
            prefix,
            local_metadata,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
        )
