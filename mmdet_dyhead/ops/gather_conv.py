"""Deformable convolution as a gather of bilinear taps and a matrix product.

:class:`GatherConvFunction` computes, for every output pixel ``p`` of every
term (one output map sampling one map of the pixel table)::

    index, tap_weight = bilinear_taps(offset[:, p], mask[:, p], ...)
    cols[p, k, :] = sum_{j<4} tap_weight[p*K + k, j]
                              * rows[index[p*K + k, j], :]
    out[:, p]     = W (C_out, K * C_in) @ cols[p].flatten()

i.e. DCNv2 over a channels-last table of pixel rows (see
:func:`~mmdet_dyhead.ops.bilinear_taps.pixel_table`).

Why this shape (measured in docs/design.md):

- ``embedding_bag(mode='sum', per_sample_weights=...)`` does the four-corner
  gather and the weighted sum in one multithreaded pass over contiguous
  C-channel rows; no (N, C, K*H*W) grid_sample output, no mask multiply.
- The work is cut into chunks of output pixels whose columns fit in cache
  and are consumed by the matrix product right away, so the K-times larger
  column matrix never exists for a whole map.
- Backward keeps only what the forward was given (the maps the table was
  built from, the weight, offsets and masks), like mmcv; the taps (4K row
  indices and weights per output pixel) are built for the whole call in
  one vectorised pass in the forward, used and dropped, then built again
  in the backward together with the table. Per chunk the backward takes
  the weight gradient and the column gradient with two matrix products,
  the tap-weight gradient from ``embedding_bag``'s own backward, and
  scatters the column gradient to the rows with a second ``embedding_bag``
  over the sorted row indices (a gather is much faster than ``index_add_``
  of 4*K rows per pixel on CPU); one autograd pass through the tap
  construction then gives the offset and mask gradients.
- Several maps can share one call when they share the weight (one DyHead
  branch on every pyramid level).
"""

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .bilinear_taps import bilinear_taps, table_rows

# Output pixels per chunk on CPU. 512 pixels x 9 taps x 256 channels of
# float32 columns is 4.7 MB, which stays in cache between the gather and
# the matrix product. In the chunk-size sweep of docs/design.md (step 2)
# 512 was within 2% of the fastest size (1024) and halves the per-chunk
# buffers of the backward (step 6).
CPU_CHUNK_PIXELS = 512


class SampledMap(NamedTuple):
    """Where one term of a :func:`gather_conv` call reads and writes.

    Attributes:
        row_base (int): Table row of the sampled map's pixel (0, 0) of
            sample 0.
        in_size (tuple[int, int]): (H, W) of the sampled map.
        out_size (tuple[int, int]): (H_out, W_out) of the term's output.
    """

    row_base: int
    in_size: Tuple[int, int]
    out_size: Tuple[int, int]


def _chunks(terms: Sequence[SampledMap], batch: int, device: torch.device):
    """Yield (term, sample, p0, p1, tap_row0) over all output pixels."""
    pixel = 0
    for t, term in enumerate(terms):
        hw = term.out_size[0] * term.out_size[1]
        step = CPU_CHUNK_PIXELS if device.type == 'cpu' else hw
        for s in range(batch):
            for p0 in range(0, hw, step):
                p1 = min(hw, p0 + step)
                yield t, s, p0, p1, pixel + s * hw + p0
        pixel += batch * hw


def _all_taps(
    terms: Sequence[SampledMap],
    offsets: Sequence[Tensor],
    masks: Sequence[Tensor],
    geometry,
    dtype: torch.dtype,
) -> Tuple[Tensor, Tensor]:
    """(B, 4) row indices and weights of every tap of every term."""
    indices, weights = [], []
    for term, off, msk in zip(terms, offsets, masks):
        shape = (off.shape[0], -1, *term.out_size)
        idx, tw = bilinear_taps(
            off.reshape(shape),
            msk.reshape(shape),
            term.in_size,
            term.row_base,
            *geometry,
            weight_dtype=dtype,
        )
        indices.append(idx)
        weights.append(tw)
    if len(indices) == 1:
        return indices[0], weights[0]
    return torch.cat(indices), torch.cat(weights)


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


class GatherConvFunction(torch.autograd.Function):
    """Autograd function behind :func:`gather_conv`; see the module doc.

    Inputs: ``rows`` (R, C_in, no gradient), ``weight`` (C_out, C_in, kh,
    kw), the ``terms``, ``geometry`` and ``num_maps`` constants, then the
    ``num_maps`` maps the table was built from, the T offsets
    (N, 2K, H_out * W_out) and the T masks (N, K, H_out * W_out).
    """

    @staticmethod
    def forward(
        ctx,
        rows: Tensor,
        weight: Tensor,
        terms: Tuple[SampledMap, ...],
        geometry,
        num_maps: int,
        *tensors: Tensor,
    ):
        co, ci, kh, kw = weight.shape
        taps = kh * kw
        num = len(terms)
        offsets = tensors[num_maps : num_maps + num]
        masks = tensors[num_maps + num :]
        batch = offsets[0].shape[0]
        kernel = weight.permute(0, 2, 3, 1).reshape(co, taps * ci)
        # float32 on CPU: oneDNN's direct convolution does the product about
        # twice as fast as the BLAS ``mm`` (docs/design.md, step 7). The
        # columns (P, K * C_in) are read as a 1 x (P * K) channels-last image
        # and convolved with the weight as a 1 x K kernel of stride K.
        by_conv = rows.device.type == 'cpu' and rows.dtype == torch.float32
        kernel_1xk = weight.reshape(co, ci, 1, taps)
        index, tap_weight = _all_taps(
            terms, offsets, masks, geometry, rows.dtype
        )
        outs = [
            rows.new_empty(batch, co, t.out_size[0] * t.out_size[1])
            for t in terms
        ]
        for t, s, p0, p1, t0 in _chunks(terms, batch, rows.device):
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
                outs[t][s, :, p0:p1] = product[0, :, 0]
            else:
                torch.mm(kernel, cols.t(), out=outs[t][s, :, p0:p1])
        # Neither the taps, the table nor the (C_out, K * C_in) kernel copy
        # is kept: backward rebuilds them from what the graph holds anyway.
        ctx.save_for_backward(weight, *tensors)
        ctx.terms = terms
        ctx.geometry = geometry
        ctx.num_maps = num_maps
        ctx.rows_dtype = rows.dtype
        return tuple(
            o.view(batch, co, *t.out_size) for o, t in zip(outs, terms)
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outs):
        weight, *tensors = ctx.saved_tensors
        terms, geometry, num_maps = ctx.terms, ctx.geometry, ctx.num_maps
        num = len(terms)
        maps = tensors[:num_maps]
        offsets = tensors[num_maps : num_maps + num]
        masks = tensors[num_maps + num :]
        need = ctx.needs_input_grad
        need_weight = need[1]
        need_maps = need[5 : 5 + num_maps]
        need_off = need[5 + num_maps : 5 + num_maps + num]
        need_mask = need[5 + num_maps + num :]
        need_rows = any(need_maps)
        need_tap = any(need_off) or any(need_mask)
        rows = table_rows(maps).to(ctx.rows_dtype)
        co, ci, kh, kw = weight.shape
        taps = kh * kw
        kernel = (
            weight.to(rows.dtype).permute(0, 2, 3, 1).reshape(co, taps * ci)
        )
        batch = offsets[0].shape[0]
        on_cpu = rows.device.type == 'cpu'
        off_leaves = [
            o.detach().requires_grad_(n) for o, n in zip(offsets, need_off)
        ]
        mask_leaves = [
            m.detach().requires_grad_(n) for m, n in zip(masks, need_mask)
        ]
        with torch.enable_grad():
            index, tap_weight = _all_taps(
                terms, off_leaves, mask_leaves, geometry, rows.dtype
            )
        grad_rows = torch.zeros_like(rows) if need_rows else None
        grad_tap = torch.zeros_like(tap_weight) if need_tap else None
        grad_kernel = kernel.new_zeros(kernel.shape) if need_weight else None
        grads = [
            None if g is None else g.reshape(batch, co, -1) for g in grad_outs
        ]
        # Rows get their gradient from the sorted scatter on CPU, from
        # embedding_bag's own (atomic) backward elsewhere.
        rows_leaf = rows.requires_grad_(need_rows and not on_cpu)
        for t, s, p0, p1, t0 in _chunks(terms, batch, rows.device):
            if grads[t] is None:
                continue
            b0, b1 = t0 * taps, (t0 + p1 - p0) * taps
            go = grads[t][s, :, p0:p1]  # (C_out, P)
            idx = index[b0:b1]
            tap_leaf = tap_weight[b0:b1].detach().requires_grad_(need_tap)
            with torch.enable_grad():
                cols = F.embedding_bag(
                    idx, rows_leaf, per_sample_weights=tap_leaf, mode='sum'
                )
            if need_weight:
                grad_kernel.addmm_(go, cols.detach().view(p1 - p0, taps * ci))
            if not (need_rows or need_tap):
                continue
            grad_cols = torch.mm(go.t(), kernel).view(-1, ci)
            leaves = [
                leaf for leaf in (tap_leaf, rows_leaf) if leaf.requires_grad
            ]
            if leaves:
                got = torch.autograd.grad(cols, leaves, grad_cols)
                if need_tap:
                    grad_tap[b0:b1] = got[0]
                if rows_leaf.requires_grad:
                    grad_rows += got[-1]
            if need_rows and on_cpu:
                _scatter_rows(
                    grad_rows, idx, tap_weight[b0:b1].detach(), grad_cols
                )
        grad_offsets, grad_masks = [None] * num, [None] * num
        if need_tap:
            wanted = [
                (i, leaf)
                for i, leaf in enumerate(off_leaves + mask_leaves)
                if leaf.requires_grad
            ]
            got = torch.autograd.grad(
                tap_weight, [leaf for _, leaf in wanted], grad_tap
            )
            for (i, _), g in zip(wanted, got):
                if i < num:
                    grad_offsets[i] = g
                else:
                    grad_masks[i - num] = g
        grad_weight = None
        if need_weight:
            grad_weight = (
                grad_kernel.view(co, kh, kw, ci)
                .permute(0, 3, 1, 2)
                .contiguous()
            )
        grad_maps, row0 = [], 0
        for m, n in zip(maps, need_maps):
            b, c, h, w = m.shape
            if n:
                grad_maps.append(
                    grad_rows[row0 : row0 + b * h * w]
                    .view(b, h, w, c)
                    .permute(0, 3, 1, 2)
                    .to(m.dtype)
                )
            else:
                grad_maps.append(None)
            row0 += b * h * w
        return (
            None,
            grad_weight,
            None,
            None,
            None,
            *grad_maps,
            *grad_offsets,
            *grad_masks,
        )


def gather_conv(
    rows: Tensor,
    maps: Sequence[Tensor],
    terms: Sequence[SampledMap],
    offsets: Sequence[Tensor],
    masks: Sequence[Tensor],
    weight: Tensor,
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
) -> List[Tensor]:
    """Deformable conv of one weight over one or several maps of a table.

    Args:
        rows (Tensor): Pixel table (R, C_in) of ``maps`` (``pixel_table``),
            possibly cast to the compute dtype; no gradient flows through it.
        maps (Sequence[Tensor]): The (N, C_in, H, W) maps ``rows`` holds, in
            table order; their gradients are returned directly.
        terms (Sequence[SampledMap]): Per output map, where it reads.
        offsets (Sequence[Tensor]): Per term, (N, 2K, H_out, W_out).
        masks (Sequence[Tensor]): Per term, (N, K, H_out, W_out).
        weight (Tensor): Kernel (C_out, C_in, kh, kw), in ``rows``' dtype.
        kernel_size, stride, padding, dilation (tuple[int, int]): Geometry.

    Returns:
        list[Tensor]: One (N, C_out, H_out, W_out) map per term (no bias).
    """
    # Plain ints: under torch.jit.trace, sizes read off tensors are traced
    # values, which an autograd function cannot take as constants.
    terms = tuple(
        SampledMap(
            int(t.row_base),
            tuple(int(v) for v in t.in_size),
            tuple(int(v) for v in t.out_size),
        )
        for t in terms
    )
    geometry = tuple(
        tuple(int(v) for v in g)
        for g in (kernel_size, stride, padding, dilation)
    )
    flat = [o.reshape(o.shape[0], o.shape[1], -1) for o in (*offsets, *masks)]
    return list(
        GatherConvFunction.apply(
            rows.detach(), weight, terms, geometry, len(maps), *maps, *flat
        )
    )


def apply_bias(outs: List[Tensor], bias: Optional[Tensor]) -> List[Tensor]:
    if bias is None:
        return outs
    return [o + bias.to(o.dtype).view(1, -1, 1, 1) for o in outs]
