"""One DyHead block: pi_C(pi_S(pi_L(F))) (paper Eq. 2, Figure 2a)."""

from typing import List, Optional, Sequence

import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import BaseModule, constant_init, normal_init
from torch import Tensor

from ..key_mapping import MMDET_TO_OURS, has_mmdet_keys
from .hard_sigmoid import check_hsigmoid_style
from .scale_attention import ScaleAwareAttention
from .spatial_attention import SpatialAwareAttention
from .task_attention import TaskAwareAttention

ATTENTION_ORDERS = ('spatial_first', 'scale_first')


def _hooked(module: Optional[nn.Module]) -> bool:
    return module is not None and bool(
        module._forward_hooks or module._forward_pre_hooks
    )


INIT_STYLES = ('mmdet', 'official')


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
        if attention_order not in ATTENTION_ORDERS:
            raise ValueError(
                f'attention_order={attention_order!r} does not '
                f'exist; choose one of {ATTENTION_ORDERS}.'
            )
        if init_style not in INIT_STYLES:
            raise ValueError(
                f'init_style={init_style!r} does not exist; '
                f'choose one of {INIT_STYLES}.'
            )
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
        outs = []
        for terms in spatial.pyramid_terms(feats, offsets, masks):
            outs.append(self._fuse(terms, level_weights))
        return outs

    def _fuse(self, terms, level_weights) -> Tensor:
        """mean_t w_t * term_t, then pi_C, for one output level.

        In 'spatial_first' order the scale attention pools every term; the
        task attention's pooling of the fused map is then the same weighted
        mean of those pooled vectors (the mean is linear), so no pass over
        the fused map is spent on it. Scalars w_t / T are folded before the
        multiply and the sum is accumulated in place (addcmul_ on a fresh
        tensor whose old value no backward needs).
        """
        inv = 1.0 / len(terms)
        pooled_terms = None
        coeffs = []
        if self.scale_attn is None:
            coeffs = [None] * len(terms)
        elif level_weights is not None:
            coeffs = [level_weights[src] * inv for src, _ in terms]
        elif _hooked(self.scale_attn) or _hooked(self.task_attn):
            # Forward hooks (e.g. attention visualisation) must see the
            # modules called on full maps, as in the plain formulation.
            coeffs = [self.scale_attn(term) * inv for _, term in terms]
        else:
            pooled_terms = [
                term.mean(dim=(2, 3), keepdim=True) for _, term in terms
            ]
            coeffs = [
                self.scale_attn.from_pooled(p) * inv for p in pooled_terms
            ]
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
        if _hooked(self.task_attn):
            return self.task_attn(fused)
        if pooled is None:
            pooled = fused.mean(dim=(2, 3), keepdim=True)
        return self.task_attn.apply_coefficients(
            fused, *self.task_attn.coefficients_from_pooled(pooled)
        )

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
        if has_mmdet_keys(state_dict, prefix):
            for key in [k for k in state_dict if k.startswith(prefix)]:
                rel = key[len(prefix) :]
                for old, new in MMDET_TO_OURS:
                    if rel.startswith(old):
                        state_dict[prefix + new + rel[len(old) :]] = (
                            state_dict.pop(key)
                        )
                        break
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
