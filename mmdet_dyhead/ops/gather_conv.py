"""Deformable convolution as a gather of bilinear taps and a matrix product.

:class:`GatherConvFunction` computes, for every output pixel ``p``::

    cols[p, k, :] = sum_{j<4} tap_weight[p*K + k, j] * rows[index[p*K + k, j], :]
    out[:, p]     = W (C_out, K * C_in) @ cols[p].flatten()

i.e. DCNv2 once :func:`~mmdet_dyhead.ops.bilinear_taps.bilinear_taps` has
turned offsets and masks into row indices and (mask-folded) weights.

Why this shape (measured in docs/design.md):

- ``embedding_bag(mode='sum', per_sample_weights=...)`` does the four-corner
  gather and the weighted sum in one multithreaded pass over contiguous
  C-channel rows; no (N, C, K*H*W) grid_sample output, no mask multiply.
- The work is cut into chunks of output pixels whose columns fit in cache
  and are consumed by the matrix product right away, so the K-times
  larger column matrix never exists in full: less memory, and no page
  faults on a fresh multi-hundred-MB buffer per call.
- Backward recomputes each chunk's columns (like mmcv, it saves no
  columns), takes the weight gradient and the column gradient with two
  matrix products, the tap-weight gradient from ``embedding_bag``'s own
  backward, and scatters the column gradient to the rows with a second
  ``embedding_bag`` over the sorted row indices (a gather is much faster
  than ``index_add_`` of 4*K rows per pixel on CPU).
- Several maps can share one call when they share the weight (one DyHead
  branch on every pyramid level): their taps are concatenated, each output
  segment is one (level, sample) map.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# Output pixels per chunk on CPU. 1024 pixels x 9 taps x 256 channels of
# float32 columns is 9.4 MB: it stays in L3 between the gather and the
# matrix product, and the matrix product is still large enough to run at
# full speed (docs/design.md, chunk-size table).
CPU_CHUNK_PIXELS = 1024


def _chunks(shapes: Sequence[Tuple[int, int, int]], device: torch.device):
    """Yield (segment, sample, p0, p1, tap_row0) over all output pixels."""
    pixel = 0
    for seg, (n, ho, wo) in enumerate(shapes):
        hw = ho * wo
        step = CPU_CHUNK_PIXELS if device.type == 'cpu' else hw
        for s in range(n):
            for p0 in range(0, hw, step):
                p1 = min(hw, p0 + step)
                yield seg, s, p0, p1, pixel + s * hw + p0
        pixel += n * hw


def _scatter_rows(grad_rows: Tensor, index: Tensor, tap_weight: Tensor,
                  grad_cols: Tensor) -> None:
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
        order // 4, grad_cols, starts,
        per_sample_weights=tap_weight.reshape(-1)[order], mode='sum')


class GatherConvFunction(torch.autograd.Function):
    """Autograd function behind :func:`gather_conv`; see the module doc."""

    @staticmethod
    def forward(ctx, rows: Tensor, index: Tensor, tap_weight: Tensor,
                weight: Tensor, shapes: Tuple[Tuple[int, int, int], ...]):
        co, ci, kh, kw = weight.shape
        taps = kh * kw
        kernel = weight.permute(0, 2, 3, 1).reshape(co, taps * ci)
        outs = [rows.new_empty(n, co, ho * wo) for n, ho, wo in shapes]
        for seg, s, p0, p1, t0 in _chunks(shapes, rows.device):
            b0, b1 = t0 * taps, (t0 + p1 - p0) * taps
            cols = F.embedding_bag(index[b0:b1], rows,
                                   per_sample_weights=tap_weight[b0:b1],
                                   mode='sum').view(p1 - p0, taps * ci)
            torch.mm(kernel, cols.t(), out=outs[seg][s, :, p0:p1])
        ctx.save_for_backward(rows, index, tap_weight, kernel)
        ctx.shapes = shapes
        ctx.weight_shape = weight.shape
        return tuple(o.view(n, co, ho, wo) for o, (n, ho, wo) in zip(outs, shapes))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outs):
        rows, index, tap_weight, kernel = ctx.saved_tensors
        need_rows, _, need_tap, need_weight, _ = ctx.needs_input_grad
        co, ci, kh, kw = ctx.weight_shape
        taps = kh * kw
        on_cpu = rows.device.type == 'cpu'
        grad_rows = torch.zeros_like(rows) if need_rows else None
        grad_tap = torch.zeros_like(tap_weight) if need_tap else None
        grad_kernel = kernel.new_zeros(kernel.shape) if need_weight else None
        grads = [None if g is None else g.reshape(n, co, ho * wo)
                 for g, (n, ho, wo) in zip(grad_outs, ctx.shapes)]
        for seg, s, p0, p1, t0 in _chunks(ctx.shapes, rows.device):
            if grads[seg] is None:
                continue
            b0, b1 = t0 * taps, (t0 + p1 - p0) * taps
            go = grads[seg][s, :, p0:p1]  # (C_out, P)
            idx = index[b0:b1]
            # Rows get their gradient from the sorted scatter on CPU, from
            # embedding_bag's own (atomic) backward elsewhere.
            rows_leaf = rows.detach().requires_grad_(need_rows and not on_cpu)
            tap_leaf = tap_weight[b0:b1].detach().requires_grad_(need_tap)
            with torch.enable_grad():
                cols = F.embedding_bag(idx, rows_leaf, per_sample_weights=tap_leaf,
                                       mode='sum')
            if need_weight:
                grad_kernel.addmm_(go, cols.detach().view(p1 - p0, taps * ci))
            if not (need_rows or need_tap):
                continue
            grad_cols = torch.mm(go.t(), kernel).view(-1, ci)
            leaves = [t for t, need in ((tap_leaf, need_tap),
                                        (rows_leaf, need_rows and not on_cpu)) if need]
            if leaves:
                got = torch.autograd.grad(cols, leaves, grad_cols)
                if need_tap:
                    grad_tap[b0:b1] = got[0]
                if need_rows and not on_cpu:
                    grad_rows += got[-1]
            if need_rows and on_cpu:
                _scatter_rows(grad_rows, idx, tap_weight[b0:b1], grad_cols)
        grad_weight = None
        if need_weight:
            grad_weight = grad_kernel.view(co, kh, kw, ci).permute(0, 3, 1, 2).contiguous()
        return grad_rows, None, grad_tap, grad_weight, None


def gather_conv(rows: Tensor, index: Tensor, tap_weight: Tensor,
                weight: Tensor,
                shapes: Sequence[Tuple[int, int, int]]) -> List[Tensor]:
    """Deformable conv from precomputed taps, for one or several output maps.

    Args:
        rows (Tensor): Pixel table (R, C_in), see ``pixel_table``.
        index (Tensor): (B, 4) int64 table rows of each tap's corners.
        tap_weight (Tensor): (B, 4) bilinear weights times mask.
        weight (Tensor): Kernel (C_out, C_in, kh, kw).
        shapes (Sequence[tuple[int, int, int]]): (N, H_out, W_out) of each
            output map, in the order their taps appear in ``index``;
            ``B = K * sum(N * H_out * W_out)``.

    Returns:
        list[Tensor]: One (N, C_out, H_out, W_out) map per entry of
        ``shapes`` (no bias).
    """
    weight = weight.to(rows.dtype)
    # Plain ints: under torch.jit.trace, sizes read off tensors are traced
    # values, which an autograd function cannot take as constants.
    shapes = tuple(tuple(int(v) for v in shape) for shape in shapes)
    return list(GatherConvFunction.apply(rows, index, tap_weight.to(rows.dtype),
                                         weight, shapes))


def apply_bias(outs: List[Tensor], bias: Optional[Tensor]) -> List[Tensor]:
    if bias is None:
        return outs
    return [o + bias.to(o.dtype).view(1, -1, 1, 1) for o in outs]
