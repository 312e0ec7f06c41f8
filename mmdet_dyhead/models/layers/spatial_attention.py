"""Spatial-aware attention pi_S (paper Eq. 4)."""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from torch import Tensor

from mmdet_dyhead.ops import ModulatedDeformConv
from mmdet_dyhead.utils.misc import check_choice

OFFSET_MODES = ('legacy', 'aligned')


def _upsample(x: Tensor, size) -> Tensor:
    """Bilinear resize with ``align_corners=True`` (mmdet's high branch).

    Under ``torch.compile`` a 1x1 map is broadcast instead: the same values
    (every output reads the one pixel), and torch 2.13's inductor fails to
    generate CPU code for the backward of a bilinear resize of a 1x1 map
    (an assertion in its vectorised scatter-add).
    """
    if tuple(x.shape[-2:]) == (1, 1) and torch.compiler.is_compiling():
        return x.expand(*x.shape[:2], *size)
    return F.interpolate(x, size=size, mode='bilinear', align_corners=True)


class DeformConvNorm(nn.Module):
    """One branch of pi_S: a 3x3 DCNv2 (or plain conv) and a norm.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        stride (int): 1, or 2 for the branch reading the finer level.
        deformable (bool): DCNv2 when True; a plain 3x3 conv (the "S off"
            ablation) when False.
        bias (bool): Conv bias. The released code has one before GN, mmdet
            has none (GN's shift makes it redundant in value, not in keys).
        norm_cfg (dict | None): Norm after the conv. Default GN(16).
        dcn_backend (str): ``'auto'|'mmcv'|'torch'``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        deformable: bool = True,
        bias: bool = False,
        norm_cfg: Optional[dict] = dict(
            type='GN', num_groups=16, requires_grad=True
        ),
        dcn_backend: str = 'auto',
    ) -> None:
        super().__init__()
        self.deformable = deformable
        if deformable:
            self.conv = ModulatedDeformConv(
                in_channels,
                out_channels,
                3,
                stride=stride,
                padding=1,
                bias=bias,
                backend=dcn_backend,
            )
        else:
            self.conv = nn.Conv2d(
                in_channels,
                out_channels,
                3,
                stride=stride,
                padding=1,
                bias=bias,
            )
        self.norm = (
            build_norm_layer(norm_cfg, out_channels)[1] if norm_cfg else None
        )

    def forward(
        self,
        maps: Sequence[Tensor],
        sources: Sequence[int],
        offsets: Sequence[Optional[Tensor]],
        masks: Sequence[Optional[Tensor]],
    ) -> List[Tensor]:
        """The branch on several maps (one DCN per map, one shared weight).

        Args:
            maps (Sequence[Tensor]): Maps (N, C_in, H_i, W_i).
            sources (Sequence[int]): The map each output reads.
            offsets, masks (Sequence[Tensor | None]): Per output, at its
                grid, (N, 18, H_out, W_out) and (N, 9, H_out, W_out); None
                for the plain conv.

        Returns:
            list[Tensor]: One (N, C_out, H_out, W_out) map per source.
        """
        if self.deformable:
            outs = self.conv.forward_maps(maps, offsets, masks, sources)
        else:
            outs = [self.conv(maps[s]) for s in sources]
        if self.norm is None:
            return outs
        return [self.norm(x) for x in outs]


class SpatialAwareAttention(nn.Module):
    """Spatial-aware attention, Eq. 4, over a window of neighbouring levels.

    For output level l, Eq. 4 sums ``w_{l',k} * F(l'; p_k + dp_k; c) * dm_k``
    over the K=9 taps of a deformable conv and over levels l'. Offsets dp and
    masks dm are learned from level l's own feature (one 3x3 conv, 18 offset
    + 9 mask channels) and shared by the three level branches:

    - ``mid``: DCN on level l (stride 1);
    - ``low``: DCN on the finer level l-1 with stride 2, landing on l's grid;
    - ``high``: DCN on the coarser level l+1, then bilinear upsampling to l.

    As in both reference implementations the sum over l' spans these (up to)
    three neighbours rather than all L levels, so the pyramid keeps its
    levels and blocks can be stacked. The 1/L average and the scale weights
    are applied by :class:`DynamicHeadBlock`.

    The high branch needs offsets on level l+1's grid, but they are predicted
    on level l's. ``offset_mode`` decides how they get there:

    - ``'legacy'``: what the released code and mmdet 3.3 do. The (H, W)
      offset/mask tensors go to a DCN whose output is (H', W') = level l+1;
      mmcv reads each sample's first 18*H'*W' offset (9*H'*W' mask) values
      as if laid out (18, H', W'). The result is a scrambled but
      deterministic assignment; reproduced here bit for bit so released
      checkpoints give the same outputs.
    - ``'aligned'``: what Eq. 4 means. Level l+1 pixel (i, j) sits on level
      l pixel (2i, 2j) (stride-2 convs and pooling are centred there), so the
      offsets and masks are subsampled at those pixels and the offsets are
      halved (one level-(l+1) pixel is two level-l pixels).

    Args:
        in_channels (int): Channels of the input levels.
        out_channels (int): Channels of each branch output.
        deformable (bool): False gives plain 3x3 convs (Table 1 "S off").
        offset_mode (str): ``'legacy'`` or ``'aligned'``.
        dcn_bias (bool): Bias in the branch convs.
        norm_cfg (dict | None): Norm after each branch conv.
        dcn_backend (str): ``'auto'|'mmcv'|'torch'``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        deformable: bool = True,
        offset_mode: str = 'legacy',
        dcn_bias: bool = False,
        norm_cfg: Optional[dict] = dict(
            type='GN', num_groups=16, requires_grad=True
        ),
        dcn_backend: str = 'auto',
    ) -> None:
        super().__init__()
        check_choice(
            'offset_mode',
            offset_mode,
            OFFSET_MODES,
            "('legacy': bit-compatible with mmdet/official checkpoints; "
            "'aligned': offsets resampled to the coarser level, Eq. 4)",
        )
        self.deformable = deformable
        self.offset_mode = offset_mode
        self.num_taps = 9
        if deformable:
            self.offset_conv = nn.Conv2d(
                in_channels, 3 * self.num_taps, 3, padding=1
            )
        branch = dict(
            deformable=deformable,
            bias=dcn_bias,
            norm_cfg=norm_cfg,
            dcn_backend=dcn_backend,
        )
        self.high_branch = DeformConvNorm(
            in_channels, out_channels, 1, **branch
        )
        self.mid_branch = DeformConvNorm(
            in_channels, out_channels, 1, **branch
        )
        self.low_branch = DeformConvNorm(
            in_channels, out_channels, 2, **branch
        )

    def offsets_and_masks(self, feat: Tensor) -> Tuple[Tensor, Tensor]:
        """Predict (N, 18, H, W) offsets and (N, 9, H, W) masks from
        ``feat``.
        """
        out = self.offset_conv(feat)
        return out[:, : 2 * self.num_taps], out[
            :, 2 * self.num_taps :
        ].sigmoid()

    def coarser_level_offsets(
        self, offset: Tensor, mask: Tensor, size: Tuple[int, int]
    ) -> Tuple[Tensor, Tensor]:
        """Offsets/masks of level l for a DCN whose output grid is ``size``."""
        h, w = size
        n = offset.shape[0]
        if self.offset_mode == 'legacy':
            # Emulate mmcv reading the per-sample buffer flat (see class doc).
            taps = self.num_taps
            return (
                offset.reshape(n, -1)[:, : 2 * taps * h * w].view(
                    n, 2 * taps, h, w
                ),
                mask.reshape(n, -1)[:, : taps * h * w].view(n, taps, h, w),
            )
        return offset[:, :, ::2, ::2] * 0.5, mask[:, :, ::2, ::2]

    def forward(
        self,
        feats: Sequence[Tensor],
        offsets: Optional[Sequence[Tensor]] = None,
        masks: Optional[Sequence[Tensor]] = None,
    ) -> List[List[Tuple[int, Tensor]]]:
        """The resampled neighbours of every level, each on that level's grid.

        Each branch runs once over all the levels it reads (mid: every
        level; low: all but the coarsest; high: all but the finest).

        Args:
            feats (Sequence[Tensor]): L maps (N, C_in, H_l, W_l), level l+1
                half the size of level l.
            offsets, masks (Sequence[Tensor], optional): Per level, from
                :meth:`offsets_and_masks`; required when deformable.

        Returns:
            list[list[tuple[int, Tensor]]]: Per output level l, the
            ``(source_level, feature)`` pairs in the order mid (l), low
            (l - 1), high (l + 1), where those levels exist; features are
            (N, C_out, H_l, W_l).
        """
        num = len(feats)
        if not self.deformable:
            offsets = masks = [None] * num
        pyramid = list(feats)
        mid = self.mid_branch(pyramid, range(num), offsets, masks)
        # Level l's offsets drive the low branch reading level l - 1.
        low = self.low_branch(pyramid, range(num - 1), offsets[1:], masks[1:])
        high_offsets, high_masks = [None] * (num - 1), [None] * (num - 1)
        if self.deformable:
            coarse = [
                self.coarser_level_offsets(
                    offsets[lvl], masks[lvl], feats[lvl + 1].shape[-2:]
                )
                for lvl in range(num - 1)
            ]
            high_offsets = [o for o, _ in coarse]
            high_masks = [m for _, m in coarse]
        high = self.high_branch(
            pyramid, range(1, num), high_offsets, high_masks
        )
        terms = []
        for lvl in range(num):
            level = [(lvl, mid[lvl])]
            if lvl > 0:
                level.append((lvl - 1, low[lvl - 1]))
            if lvl < num - 1:
                level.append(
                    (lvl + 1, _upsample(high[lvl], feats[lvl].shape[-2:]))
                )
            terms.append(level)
        return terms
