"""Bilinear sampling of deformable-conv taps as (row index, weight) pairs.

A DCNv2 tap reads ``x`` at a fractional position ``p = p0 + p_k + dp_k``.
Bilinear interpolation makes that read a weighted sum of the four pixels
around ``p``; with the features stored as a table of pixel rows (one row of
C channels per pixel, see :func:`table_rows`), a tap becomes four row
indices and four weights. The modulation mask is folded into the weights,
so the sampled column needs no separate multiply.

:func:`tap_input_gradients` is the closed-form derivative of those weights:
given the gradient of the loss with respect to each tap weight it returns
the offset and mask gradients, with mmcv's conventions (below).
"""

from typing import NamedTuple, Tuple

import torch
from torch import Tensor


def table_rows(feat: Tensor) -> Tensor:
    """The (N * H * W, C) channels-last pixel rows of ``feat`` (N, C, H, W).

    Row ``n * H * W + y * W + x`` holds pixel (y, x) of sample n.
    """
    return feat.permute(0, 2, 3, 1).reshape(-1, feat.shape[1]).contiguous()


class TapGeometry(NamedTuple):
    """Bilinear corners of every tap, shaped (N, H_out, W_out, K[, 2]).

    Attributes:
        ys, xs (Tensor): int64 rows and columns of the two corner lines,
            (..., K, 2), not clamped.
        ly, lx (Tensor): Fractional parts of the position, (..., K).
        in_y, in_x (Tensor): 1 for a corner line inside the map, else 0,
            (..., K, 2).
        mask (Tensor): The modulation scalars, (..., K).
        inside (Tensor): 1 when the tap counts, see :func:`bilinear_taps`,
            (..., K).
    """

    ys: Tensor
    xs: Tensor
    ly: Tensor
    lx: Tensor
    in_y: Tensor
    in_x: Tensor
    mask: Tensor
    inside: Tensor

    def corner_weights(self) -> Tuple[Tensor, Tensor]:
        """(wy, wx), each (..., K, 2): 0 for a corner outside the map."""
        wy = torch.stack((1 - self.ly, self.ly), -1) * self.in_y
        wx = torch.stack((1 - self.lx, self.lx), -1) * self.in_x
        return wy, wx


def _tap_geometry(
    offset: Tensor,
    mask: Tensor,
    in_size: Tuple[int, int],
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
) -> TapGeometry:
    n, _, ho, wo = (int(v) for v in offset.shape)
    kh, kw = kernel_size
    taps = kh * kw
    h, w = (int(v) for v in in_size)
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
        offset.to(coord_dtype)
        .reshape(n, taps, 2, ho, wo)
        .permute(0, 3, 4, 1, 2)
    )
    pos_y = base_y + off[..., 0]  # (N, H_out, W_out, K)
    pos_x = base_x + off[..., 1]
    y0 = pos_y.floor()
    x0 = pos_x.floor()
    ly = pos_y - y0
    lx = pos_x - x0
    y0 = y0.long()
    x0 = x0.long()
    ys = torch.stack((y0, y0 + 1), -1)  # (N, H_out, W_out, K, 2)
    xs = torch.stack((x0, x0 + 1), -1)
    in_y = ((ys >= 0) & (ys < h)).to(coord_dtype)
    in_x = ((xs >= 0) & (xs < w)).to(coord_dtype)
    # mmcv's kernel drops a tap whose position is not strictly inside
    # (-1, H) x (-1, W): its value is 0 there anyway, but it also returns a
    # zero offset gradient, where the corner weights alone would give a
    # one-sided one (at y = -1 the corner y1 = 0 has weight ly = 0 but
    # slope 1). Zero offsets put the border taps exactly on -1, so without
    # this the first training step already differs from mmcv.
    inside = (pos_y > -1) & (pos_y < h) & (pos_x > -1) & (pos_x < w)
    return TapGeometry(
        ys,
        xs,
        ly,
        lx,
        in_y,
        in_x,
        mask.to(coord_dtype).permute(0, 2, 3, 1),
        inside.to(coord_dtype),
    )


def bilinear_taps(
    offset: Tensor,
    mask: Tensor,
    in_size: Tuple[int, int],
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

    Args:
        offset (Tensor): (N, 2K, H_out, W_out), (dy, dx) per tap.
        mask (Tensor): (N, K, H_out, W_out).
        in_size (tuple[int, int]): (H, W) of the sampled map.
        kernel_size, stride, padding, dilation (tuple[int, int]): Conv
            geometry.
        weight_dtype (torch.dtype): dtype of the returned weights (the
            table's); positions are computed in float32 or float64.

    Returns:
        tuple[Tensor, Tensor]: ``index`` (B, 4) int64 rows of
        :func:`table_rows` and ``weight`` (B, 4),
        B = N * H_out * W_out * K, corners ordered (y0, x0), (y0, x1),
        (y1, x0), (y1, x1).
    """
    n = int(offset.shape[0])
    h, w = (int(v) for v in in_size)
    geo = _tap_geometry(
        offset, mask, in_size, kernel_size, stride, padding, dilation
    )
    wy, wx = geo.corner_weights()
    m = geo.mask * geo.inside
    weight = (wy * m.unsqueeze(-1)).unsqueeze(-1) * wx.unsqueeze(-2)
    sample_base = (torch.arange(n, device=offset.device) * (h * w)).view(
        n, 1, 1, 1, 1
    )
    row = sample_base + geo.ys.clamp(0, h - 1) * w
    index = row.unsqueeze(-1) + geo.xs.clamp(0, w - 1).unsqueeze(-2)
    return index.view(-1, 4), weight.to(weight_dtype).view(-1, 4)


def tap_input_gradients(
    grad_tap: Tensor,
    offset: Tensor,
    mask: Tensor,
    in_size: Tuple[int, int],
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
) -> Tuple[Tensor, Tensor]:
    """Offset and mask gradients from the gradient of every tap weight.

    A tap's corner weight is ``wy[a] * wx[c] * m`` with ``wy = (1 - ly,
    ly)`` and ``ly = y - floor(y)`` (the same in x). Its derivative along
    y is ``(-1, 1)[a] * wx[c] * m``: the slope of the corners ``floor``
    picks, i.e. at an integer position the one-sided slope towards larger
    y, which is what mmcv's kernel returns. Corners outside the map and
    taps outside (-1, H) x (-1, W) have weight and slope 0.

    Args:
        grad_tap (Tensor): (B, 4) gradient of :func:`bilinear_taps`'
            weights.
        offset, mask, in_size, kernel_size, stride, padding, dilation: As
            given to :func:`bilinear_taps`.

    Returns:
        tuple[Tensor, Tensor]: Gradients of ``offset`` (N, 2K, H_out,
        W_out) and ``mask`` (N, K, H_out, W_out), in their dtypes.
    """
    n, _, ho, wo = (int(v) for v in offset.shape)
    taps = kernel_size[0] * kernel_size[1]
    geo = _tap_geometry(
        offset, mask, in_size, kernel_size, stride, padding, dilation
    )
    wy, wx = geo.corner_weights()
    g = grad_tap.to(wy.dtype).view(n, ho, wo, taps, 2, 2)  # [.., a, c]
    g_y = (g * wx.unsqueeze(-2)).sum(-1)  # per y corner a, (..., K, 2)
    g_x = (g * wy.unsqueeze(-1)).sum(-2)  # per x corner c, (..., K, 2)
    m = geo.mask * geo.inside
    # d wy / d y = (-1, 1) on in-map corner lines (the same in x).
    d_y = (g_y[..., 1] * geo.in_y[..., 1] - g_y[..., 0] * geo.in_y[..., 0]) * m
    d_x = (g_x[..., 1] * geo.in_x[..., 1] - g_x[..., 0] * geo.in_x[..., 0]) * m
    grad_mask = (g_y * wy).sum(-1) * geo.inside
    grad_offset = torch.stack((d_y, d_x), -1).permute(0, 3, 4, 1, 2)
    # A copy: the fake implementation promises contiguous gradients.
    grad_offset = grad_offset.reshape(n, 2 * taps, ho, wo).contiguous()
    return (
        grad_offset.to(offset.dtype),
        grad_mask.permute(0, 3, 1, 2).contiguous().to(mask.dtype),
    )
