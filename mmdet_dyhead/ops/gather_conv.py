"""Deformable convolution as a gather of bilinear taps and a matrix product.

The pure-PyTorch implementation of the package's DCNv2 operator
(:mod:`.dcn_op`): :func:`gather_conv_forward` computes, for every output
pixel ``p``::

    index, tap_weight = bilinear_taps(offset[:, p], mask[:, p], ...)
    cols[p, k, :] = sum_{j<4} tap_weight[p*K + k, j]
                              * rows[index[p*K + k, j], :]
    out[:, p]     = W (C_out, K * C_in) @ cols[p].flatten()

i.e. DCNv2 over a channels-last table of pixel rows (see
:func:`~mmdet_dyhead.ops.bilinear_taps.table_rows`), and
:func:`gather_conv_backward` its four gradients in closed form (no
autograd: an operator's implementation runs below it).

Why this shape (measured in docs/design.md):

- ``embedding_bag(mode='sum', per_sample_weights=...)`` does the four-corner
  gather and the weighted sum in one multithreaded pass over contiguous
  C-channel rows; no (N, C, K*H*W) grid_sample output, no mask multiply.
- The work is cut into chunks of output pixels whose columns fit in cache
  and are consumed by the matrix product right away, so the K-times larger
  column matrix never exists for a whole map.
- Backward takes only what the forward was given (map, offsets, masks,
  weight), like mmcv; the taps are built again. Per chunk it takes the
  weight gradient and the column gradient with two matrix products, the
  tap-weight gradient (a dot product of each corner's row with its
  column gradient, embedding_bag's own per-sample-weight backward), and
  scatters the column gradient to the rows with a second ``embedding_bag``
  over the sorted row indices (a gather is much faster than ``index_add_``
  of 4*K rows per pixel on CPU). The tap-weight gradients then give the
  offset and mask gradients in closed form
  (:func:`~mmdet_dyhead.ops.bilinear_taps.tap_input_gradients`).
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .bilinear_taps import bilinear_taps, table_rows, tap_input_gradients

# Output pixels per chunk on CPU. 512 pixels x 9 taps x 256 channels of
# float32 columns is 4.7 MB, which stays in cache between the gather and
# the matrix product. In the chunk-size sweep of docs/design.md (step 2)
# 512 was within 2% of the fastest size (1024) and halves the per-chunk
# buffers of the backward (step 6).
CPU_CHUNK_PIXELS = 512

_Pair = Tuple[int, int]


def _chunks(batch: int, hw: int, device: torch.device):
    """Yield (sample, p0, p1, first tap row) over all output pixels."""
    step = CPU_CHUNK_PIXELS if device.type == 'cpu' else hw
    for s in range(batch):
        for p0 in range(0, hw, step):
            yield s, p0, min(hw, p0 + step), s * hw + p0


def _scatter_rows(
    grad_rows: Tensor, index: Tensor, tap_weight: Tensor, grad_cols: Tensor
) -> None:
    """``grad_rows[index[b, j]] += tap_weight[b, j] * grad_cols[b]``.

    Done as a gather: the (b, j) pairs are sorted by row, so each touched
    row sums its own contiguous run of bags. Only the rows this chunk
    touches are visited.
    """
    lo = int(index.min())
    hi = int(index.max()) + 1
    flat = index.reshape(-1) - lo
    sorted_rows, order = torch.sort(flat)
    counts = torch.bincount(sorted_rows, minlength=hi - lo)
    starts = torch.cumsum(counts, 0) - counts
    grad_rows[lo:hi] += F.embedding_bag(
        order // 4,
        grad_cols,
        starts,
        per_sample_weights=tap_weight.reshape(-1)[order],
        mode='sum',
    )


def _tap_weight_grad(rows: Tensor, index: Tensor, grad_cols: Tensor):
    """``sum_c rows[index[b, j], c] * grad_cols[b, c]``, shape (B, 4)."""
    bags = index.shape[0]
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad_cols,
        rows,
        index.reshape(-1),
        torch.arange(0, 4 * bags, 4, device=index.device),
        torch.arange(bags, device=index.device).repeat_interleave(4),
        0,  # mode 'sum'
    ).view(bags, 4)


def gather_conv_forward(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    stride: _Pair,
    padding: _Pair,
    dilation: _Pair,
) -> Tensor:
    """DCNv2 of one map, without bias.

    Args:
        input (Tensor): (N, C_in, H, W).
        offset (Tensor): (N, 2K, H_out, W_out), (dy, dx) per tap; any
            float dtype (positions are computed in float32 or float64).
        mask (Tensor): (N, K, H_out, W_out).
        weight (Tensor): (C_out, C_in, kh, kw), in ``input``'s dtype.
        stride, padding, dilation (tuple[int, int]): Conv geometry.

    Returns:
        Tensor: (N, C_out, H_out, W_out) in ``input``'s dtype.
    """
    co, ci, kh, kw = weight.shape
    taps = kh * kw
    batch, ho, wo = offset.shape[0], offset.shape[2], offset.shape[3]
    rows = table_rows(input)
    # float32 on CPU: oneDNN's direct convolution does the product about
    # twice as fast as the BLAS ``mm`` (docs/design.md, step 7). The
    # columns (P, K * C_in) are read as a 1 x (P * K) channels-last image
    # and convolved with the weight as a 1 x K kernel of stride K.
    by_conv = rows.device.type == 'cpu' and rows.dtype == torch.float32
    kernel = weight.permute(0, 2, 3, 1).reshape(co, taps * ci)
    kernel_1xk = weight.reshape(co, ci, 1, taps)
    index, tap_weight = bilinear_taps(
        offset,
        mask,
        input.shape[-2:],
        (kh, kw),
        stride,
        padding,
        dilation,
        rows.dtype,
    )
    out = rows.new_empty(batch, co, ho * wo)
    for s, p0, p1, t0 in _chunks(batch, ho * wo, rows.device):
        b0, b1 = t0 * taps, (t0 + p1 - p0) * taps
        cols = F.embedding_bag(
            index[b0:b1],
            rows,
            per_sample_weights=tap_weight[b0:b1],
            mode='sum',
        ).view(p1 - p0, taps * ci)
        if by_conv:
            image = cols.view(1, 1, (p1 - p0) * taps, ci)
            product = F.conv2d(
                image.permute(0, 3, 1, 2), kernel_1xk, stride=(1, taps)
            )
            out[s, :, p0:p1] = product[0, :, 0]
        else:
            torch.mm(kernel, cols.t(), out=out[s, :, p0:p1])
    return out.view(batch, co, ho, wo)


def gather_conv_backward(
    grad_out: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    stride: _Pair,
    padding: _Pair,
    dilation: _Pair,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four gradients of :func:`gather_conv_forward`, in closed form.

    Args:
        grad_out (Tensor): (N, C_out, H_out, W_out).
        input, offset, mask, weight, stride, padding, dilation: As given to
            the forward.

    Returns:
        tuple[Tensor, Tensor, Tensor, Tensor]: Gradients of ``input``,
        ``offset``, ``mask`` and ``weight``, each in its tensor's dtype.
    """
    co, ci, kh, kw = weight.shape
    taps = kh * kw
    batch, ho, wo = offset.shape[0], offset.shape[2], offset.shape[3]
    rows = table_rows(input)
    kernel = weight.to(rows.dtype).permute(0, 2, 3, 1).reshape(co, taps * ci)
    geometry = ((kh, kw), stride, padding, dilation)
    in_size = tuple(input.shape[-2:])
    index, tap_weight = bilinear_taps(
        offset, mask, in_size, *geometry, rows.dtype
    )
    on_cpu = rows.device.type == 'cpu'
    grad_rows = torch.zeros_like(rows)
    grad_tap = torch.empty_like(tap_weight)
    grad_kernel = kernel.new_zeros(kernel.shape)
    go_all = grad_out.to(rows.dtype).reshape(batch, co, ho * wo)
    for s, p0, p1, t0 in _chunks(batch, ho * wo, rows.device):
        b0, b1 = t0 * taps, (t0 + p1 - p0) * taps
        go = go_all[s, :, p0:p1]  # (C_out, P)
        idx = index[b0:b1]
        tw = tap_weight[b0:b1]
        cols = F.embedding_bag(idx, rows, per_sample_weights=tw, mode='sum')
        grad_kernel.addmm_(go, cols.view(p1 - p0, taps * ci))
        grad_cols = torch.mm(go.t(), kernel).view(-1, ci)
        grad_tap[b0:b1] = _tap_weight_grad(rows, idx, grad_cols)
        if on_cpu:
            _scatter_rows(grad_rows, idx, tw, grad_cols)
        else:
            # index_add_ is atomic on GPUs; the sort would cost more.
            grad_rows.index_add_(
                0,
                idx.reshape(-1),
                (tw.unsqueeze(-1) * grad_cols.unsqueeze(1)).view(-1, ci),
            )
    grad_offset, grad_mask = tap_input_gradients(
        grad_tap, offset, mask, in_size, *geometry
    )
    grad_weight = (
        grad_kernel.view(co, kh, kw, ci).permute(0, 3, 1, 2).contiguous()
    )
    h, w = in_size
    grad_input = (
        grad_rows.view(batch, h, w, ci).permute(0, 3, 1, 2).contiguous()
    )
    return (
        grad_input.to(input.dtype),
        grad_offset,
        grad_mask,
        grad_weight.to(weight.dtype),
    )
