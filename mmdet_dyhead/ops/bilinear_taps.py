"""Bilinear sampling of deformable-conv taps as (row index, weight) pairs.

A DCNv2 tap reads ``x`` at a fractional position ``p = p0 + p_k + dp_k``.
Bilinear interpolation makes that read a weighted sum of the four pixels
around ``p``; with the features stored as a table of pixel rows (one row of
C channels per pixel, see :func:`pixel_table`), a tap becomes four row
indices and four weights. The modulation mask is folded into the weights,
so the sampled column needs no separate multiply.

The weights are built from the offsets and masks with ordinary tensor ops,
so autograd carries their gradient back to the offsets and masks; the row
indices (the integer parts of the positions) have no gradient, as in mmcv's
kernel.
"""

from typing import List, NamedTuple, Sequence, Tuple

import torch
from torch import Tensor


class PixelTable(NamedTuple):
    """Feature maps stored as one (R, C) table of pixel rows.

    Map ``i`` (N, C, H, W) occupies rows ``bases[i] + n * H * W + y * W + x``.
    ``rows`` is built outside autograd: the deformable conv keeps ``maps``
    (which the graph holds anyway) instead of this copy, rebuilds the table
    in its backward and returns the gradients of ``maps`` directly.
    """

    rows: Tensor
    bases: List[int]
    sizes: List[Tuple[int, int]]
    batch: int
    maps: Tuple[Tensor, ...]


def table_rows(feats: Sequence[Tensor]) -> Tensor:
    """The (sum_i N * H_i * W_i, C) channels-last rows of ``feats``."""
    parts = [f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in feats]
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)


def pixel_table(feats: Sequence[Tensor]) -> PixelTable:
    """Stack maps (N, C, H_i, W_i) into a channels-last row table.

    One copy of all maps: every deformable conv that samples them (the
    three DyHead branches read the same pyramid) shares the table.

    Args:
        feats (Sequence[Tensor]): Maps of shape (N, C, H_i, W_i), same N, C.

    Returns:
        PixelTable: ``rows`` of shape (sum_i N * H_i * W_i, C).
    """
    bases, sizes, total = [], [], 0
    for f in feats:
        # ints, not the traced sizes torch.jit.trace hands out (a traced
        # ``total += ...`` would update every base in place).
        n, _, h, w = (int(v) for v in f.shape)
        bases.append(total)
        sizes.append((h, w))
        total += n * h * w
    with torch.no_grad():
        rows = table_rows(feats)
    return PixelTable(rows, bases, sizes, feats[0].shape[0], tuple(feats))


def bilinear_taps(
    offset: Tensor,
    mask: Tensor,
    in_size: Tuple[int, int],
    row_base: int,
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    weight_dtype: torch.dtype,
) -> Tuple[Tensor, Tensor]:
    """Row indices and weights of every tap of every output pixel.

    Taps are ordered output pixel first, kernel tap second:
    ``b = ((n * H_out + i) * W_out + j) * K + k``. mmcv's rules: a corner
    outside the map gets weight 0 (its index is clamped to a valid row), so
    a sample is the sum of its in-map corners; and a tap whose position is
    not strictly inside (-1, H) x (-1, W) gets weight 0 at all four
    corners, so it has no value and no gradient (offset, mask or input),
    not even on the border lines y = -1 or x = -1 that zero offsets hit.
    Between those lines the offset gradient is the one-sided slope of the
    floor-based corners, as in mmcv (at integer positions too).

    Args:
        offset (Tensor): (N, 2K, H_out, W_out), (dy, dx) per tap.
        mask (Tensor): (N, K, H_out, W_out).
        in_size (tuple[int, int]): (H, W) of the sampled map.
        row_base (int): Table row of the map's pixel (0, 0) of sample 0.
        kernel_size, stride, padding, dilation (tuple[int, int]): Conv
            geometry.
        weight_dtype (torch.dtype): dtype of the returned weights (the
            table's); positions are computed in float32 or float64.

    Returns:
        tuple[Tensor, Tensor]: ``index`` (B, 4) int64 and ``weight`` (B, 4),
        B = N * H_out * W_out * K, corners ordered (y0, x0), (y0, x1),
        (y1, x0), (y1, x1).
    """
    n, _, ho, wo = (int(v) for v in offset.shape)
    kh, kw = kernel_size
    taps = kh * kw
    h, w = (int(v) for v in in_size)
    row_base = int(row_base)
    coord_dtype = (
        torch.float64 if offset.dtype == torch.float64 else torch.float32
    )
    dev = dict(dtype=coord_dtype, device=offset.device)
    # (H_out, W_out, K) grid of undeformed tap positions.
    tap_y = (torch.arange(kh, **dev) * dilation[0]).repeat_interleave(kw)
    tap_x = (torch.arange(kw, **dev) * dilation[1]).repeat(kh)
    base_y = (torch.arange(ho, **dev) * stride[0] - padding[0]).view(
        ho, 1, 1
    ) + tap_y
    base_x = (torch.arange(wo, **dev) * stride[1] - padding[1]).view(
        1, wo, 1
    ) + tap_x
    off = (
        offset.to(coord_dtype).view(n, taps, 2, ho, wo).permute(0, 3, 4, 1, 2)
    )
    pos_y = base_y + off[..., 0]  # (N, H_out, W_out, K)
    pos_x = base_x + off[..., 1]
    y0 = pos_y.detach().floor()
    x0 = pos_x.detach().floor()
    ly = pos_y - y0
    lx = pos_x - x0
    y0 = y0.long()
    x0 = x0.long()
    ys = torch.stack((y0, y0 + 1), -1)  # (N, H_out, W_out, K, 2)
    xs = torch.stack((x0, x0 + 1), -1)
    in_y = (ys >= 0) & (ys < h)
    in_x = (xs >= 0) & (xs < w)
    wy = torch.stack((1 - ly, ly), -1) * in_y
    wx = torch.stack((1 - lx, lx), -1) * in_x
    # mmcv's kernel drops a tap whose position is not strictly inside
    # (-1, H) x (-1, W): its value is 0 there anyway, but it also returns a
    # zero offset gradient, where the corner weights alone would give a
    # one-sided one (at y = -1 the corner y1 = 0 has weight ly = 0 but
    # slope 1). Zero offsets put the border taps exactly on -1, so without
    # this the first training step already differs from mmcv.
    inside = (pos_y > -1) & (pos_y < h) & (pos_x > -1) & (pos_x < w)
    m = mask.to(coord_dtype).permute(0, 2, 3, 1) * inside.detach()
    weight = (wy * m.unsqueeze(-1)).unsqueeze(-1) * wx.unsqueeze(-2)
    sample_base = (
        torch.arange(n, device=offset.device) * (h * w) + row_base
    ).view(n, 1, 1, 1, 1)
    row = sample_base + ys.clamp_(0, h - 1) * w
    index = row.unsqueeze(-1) + xs.clamp_(0, w - 1).unsqueeze(-2)
    return index.view(-1, 4), weight.to(weight_dtype).view(-1, 4)
