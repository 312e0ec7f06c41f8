"""Spatial-aware attention pi_S (paper Eq. 4)."""

from typing import List, Optional, Sequence, Tuple

import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from torch import Tensor

from mmdet_dyhead.ops import ModulatedDeformConv
from mmdet_dyhead.ops.deform_conv import (
    deform_conv2d_on_table,
    native_path_active,
    pixel_table,
)

OFFSET_MODES = ('legacy', 'aligned')


class DeformConvNorm(nn.Module):
    """One level branch of pi_S: a 3x3 DCNv2 (or plain conv) and a norm.

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
        x: Tensor,
        offset: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
    ) -> Tensor:
        x = self.conv(x, offset, mask) if self.deformable else self.conv(x)
        return self.norm(x) if self.norm is not None else x


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
        if offset_mode not in OFFSET_MODES:
            raise ValueError(
                f'offset_mode={offset_mode!r} does not exist; choose '
                f"'legacy' (bit-compatible with mmdet/official "
                f"checkpoints) or 'aligned' (offsets resampled to the "
                f'coarser level, Eq. 4).'
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

    def level_terms(
        self,
        feats: Sequence[Tensor],
        level: int,
        offset: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
    ) -> List[Tuple[int, Tensor]]:
        """The resampled neighbours of ``level``, each on ``level``'s grid.

        Returns:
            list[tuple[int, Tensor]]: ``(source_level, feature)`` pairs in the
            order mid, low, high; features are (N, C_out, H_l, W_l).
        """
        terms = [(level, self.mid_branch(feats[level], offset, mask))]
        if level > 0:
            terms.append(
                (level - 1, self.low_branch(feats[level - 1], offset, mask))
            )
        if level < len(feats) - 1:
            coarse = feats[level + 1]
            off_hi = mask_hi = None
            if self.deformable:
                off_hi, mask_hi = self.coarser_level_offsets(
                    offset, mask, coarse.shape[-2:]
                )
            high = F.interpolate(
                self.high_branch(coarse, off_hi, mask_hi),
                size=feats[level].shape[-2:],
                mode='bilinear',
                align_corners=True,
            )
            terms.append((level + 1, high))
        return terms

    def pyramid_terms(
        self,
        feats: Sequence[Tensor],
        offsets: Optional[Sequence[Tensor]] = None,
        masks: Optional[Sequence[Tensor]] = None,
    ) -> List[List[Tuple[int, Tensor]]]:
        """:meth:`level_terms` of every level, each branch batched over levels.

        With the native DCN, a branch has one weight for all levels, so its
        convs on all levels are one gather-and-matmul call over a single
        channels-last copy of the pyramid that all three branches share.
        With mmcv's kernel (or plain convs) this is the per-level loop.

        Args:
            feats (Sequence[Tensor]): L maps (N, C_in, H_l, W_l).
            offsets, masks (Sequence[Tensor], optional): Per level, from
                :meth:`offsets_and_masks`; required when deformable.

        Returns:
            list[list[tuple[int, Tensor]]]: Per level, what
            ``level_terms(feats, level, offsets[level], masks[level])``
            returns.
        """
        num = len(feats)
        branches = (self.mid_branch, self.low_branch, self.high_branch)
        if not self.deformable or not all(
            native_path_active(b.conv.backend, feats[0]) for b in branches
        ):
            return [
                self.level_terms(
                    feats,
                    lvl,
                    None if offsets is None else offsets[lvl],
                    None if masks is None else masks[lvl],
                )
                for lvl in range(num)
            ]
        table = pixel_table(feats)

        def run(branch, sources, offs, msks):
            conv = branch.conv
            outs = deform_conv2d_on_table(
                table,
                sources,
                offs,
                msks,
                conv.weight,
                conv.bias,
                conv.stride,
                conv.padding,
                conv.dilation,
            )
            return [
                branch.norm(o) if branch.norm is not None else o for o in outs
            ]

        mid = run(self.mid_branch, list(range(num)), offsets, masks)
        low = run(
            self.low_branch, list(range(num - 1)), offsets[1:], masks[1:]
        )
        coarse = [
            self.coarser_level_offsets(
                offsets[lvl], masks[lvl], feats[lvl + 1].shape[-2:]
            )
            for lvl in range(num - 1)
        ]
        high = run(
            self.high_branch,
            list(range(1, num)),
            [o for o, _ in coarse],
            [m for _, m in coarse],
        )
        terms = []
        for lvl in range(num):
            level = [(lvl, mid[lvl])]
            if lvl > 0:
                level.append((lvl - 1, low[lvl - 1]))
            if lvl < num - 1:
                level.append(
                    (
                        lvl + 1,
                        F.interpolate(
                            high[lvl],
                            size=feats[lvl].shape[-2:],
                            mode='bilinear',
                            align_corners=True,
                        ),
                    )
                )
            terms.append(level)
        return terms
