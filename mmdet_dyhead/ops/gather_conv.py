"""Deformable convolution as a gather of bilinear taps and a matrix product.

:class:`GatherConvFunction` computes, for every output pixel ``p`` of every
term (one output map sampling one map of the pixel table)::

    index, tap_weight = bilinear_taps(offset[:, p], mask[:, p], ...)
    cols[p, k, :] = sum_{j<4} tap_weight[p*K + k, j] * rows[index[p*K + k, j], :]
    out[:, p]     = W (C_out, K * C_in) @ cols[p].flatten()

i.e. DCNv2 over a channels-last table of pixel rows (see
:func:`~mmdet_dyhead.ops.bilinear_taps.pixel_table`).

Why this shape (measured in docs/design.md):

- ``embedding_bag(mode='sum', per_sample_weights=...)`` does the four-corner
  gather and the weighted sum in one multithreaded pass over contiguous
  C-channel rows; no (N, C, K*H*W) grid_sample output, no mask multiply.
- The work is cut into chunks of output pixels whose taps and columns fit
  in cache and are consumed by the matrix product right away, so neither
  the K-times larger column matrix nor the 4K (index, weight) pairs per
  pixel ever exist for a whole map.
- Backward keeps only what the forward was given (the maps the table was
  built from, the weight, offsets and masks), like mmcv: it rebuilds the
  table once, then per chunk the taps and the columns, takes
  the weight gradient and the column gradient with two matrix products,
  the offset and mask gradients by autograd through the chunk's gather and
  tap weights, and scatters the column gradient to the rows with a second
  ``embedding_bag`` over the sorted row indices (a gather is much faster
  than ``index_add_`` of 4*K rows per pixel on CPU).
- Several maps can share one call when they share the weight (one DyHead
  branch on every pyramid level).
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .bilinear_taps import bilinear_taps, table_rows

# Output pixels per chunk on CPU. 1024 pixels x 9 taps x 256 channels of
# float32 columns is 9.4 MB: it stays in L3 between the gather and the
# matrix product, and the matrix product is still large enough to run at
# full speed (docs/design.md, chunk-size table).
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
    """Yield (term, sample, p0, p1) over all output pixels of all terms."""
    for t, term in enumerate(terms):
        hw = term.out_size[0] * term.out_size[1]
        step = CPU_CHUNK_PIXELS if device.type == 'cpu' else hw
        for s in range(batch):
            for p0 in range(0, hw, step):
                yield t, s, p0, min(hw, p0 + step)


def _chunk_taps(term: SampledMap, sample: int, p0: int, offset: Tensor,
                mask: Tensor, geometry, dtype: torch.dtype):
    """Taps of one chunk; ``offset`` (2K, P) and ``mask`` (K, P) are its."""
    h, w = term.in_size
    return bilinear_taps(offset, mask, p0, term.out_size[1], term.in_size,
                         term.row_base + sample * h * w, *geometry,
                         weight_dtype=dtype)


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
    """Autograd function behind :func:`gather_conv`; see the module doc.

    Inputs: ``rows`` (R, C_in, no gradient), ``weight`` (C_out, C_in, kh,
    kw), the ``terms``, ``geometry`` and ``num_maps`` constants, then the
    ``num_maps`` maps the table was built from, the T offsets
    (N, 2K, H_out * W_out) and the T masks (N, K, H_out * W_out).
    """

    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor,
                terms: Tuple[SampledMap, ...], geometry, num_maps: int,
                *tensors: Tensor):
        co, ci, kh, kw = weight.shape
        taps = kh * kw
        num = len(terms)
        offsets = tensors[num_maps:num_maps + num]
        masks = tensors[num_maps + num:]
        batch = offsets[0].shape[0]
        kernel = weight.permute(0, 2, 3, 1).reshape(co, taps * ci)
        outs = [rows.new_empty(batch, co, t.out_size[0] * t.out_size[1]) for t in terms]
        for t, s, p0, p1 in _chunks(terms, batch, rows.device):
            index, tap_weight = _chunk_taps(terms[t], s, p0, offsets[t][s, :, p0:p1],
                                            masks[t][s, :, p0:p1], geometry, rows.dtype)
            cols = F.embedding_bag(index, rows, per_sample_weights=tap_weight,
                                   mode='sum').view(p1 - p0, taps * ci)
            torch.mm(kernel, cols.t(), out=outs[t][s, :, p0:p1])
        # Neither the table nor the (C_out, K * C_in) kernel copy is kept:
        # the maps and the weight are alive anyway; backward rebuilds both.
        ctx.save_for_backward(weight, *tensors)
        ctx.terms = terms
        ctx.geometry = geometry
        ctx.num_maps = num_maps
        ctx.rows_dtype = rows.dtype
        return tuple(o.view(batch, co, *t.out_size) for o, t in zip(outs, terms))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outs):
        weight, *tensors = ctx.saved_tensors
        terms, geometry, num_maps = ctx.terms, ctx.geometry, ctx.num_maps
        num = len(terms)
        maps = tensors[:num_maps]
        offsets = tensors[num_maps:num_maps + num]
        masks = tensors[num_maps + num:]
        need = ctx.needs_input_grad
        need_weight = need[1]
        need_maps = need[5:5 + num_maps]
        need_off = need[5 + num_maps:5 + num_maps + num]
        need_mask = need[5 + num_maps + num:]
        need_rows = any(need_maps)
        rows = table_rows(maps).to(ctx.rows_dtype)
        co, ci, kh, kw = weight.shape
        taps = kh * kw
        kernel = weight.to(rows.dtype).permute(0, 2, 3, 1).reshape(co, taps * ci)
        batch = offsets[0].shape[0]
        on_cpu = rows.device.type == 'cpu'
        grad_rows = torch.zeros_like(rows) if need_rows else None
        grad_kernel = kernel.new_zeros(kernel.shape) if need_weight else None
        grad_offsets = [torch.zeros_like(o) if n else None for o, n in zip(offsets, need_off)]
        grad_masks = [torch.zeros_like(m) if n else None for m, n in zip(masks, need_mask)]
        grads = [None if g is None else g.reshape(batch, co, -1) for g in grad_outs]
        # Rows get their gradient from the sorted scatter on CPU, from
        # embedding_bag's own (atomic) backward elsewhere.
        rows_leaf = rows.requires_grad_(need_rows and not on_cpu)
        for t, s, p0, p1 in _chunks(terms, batch, rows.device):
            if grads[t] is None:
                continue
            go = grads[t][s, :, p0:p1]  # (C_out, P)
            off_leaf = offsets[t][s, :, p0:p1].detach().requires_grad_(need_off[t])
            mask_leaf = masks[t][s, :, p0:p1].detach().requires_grad_(need_mask[t])
            with torch.enable_grad():
                index, tap_weight = _chunk_taps(terms[t], s, p0, off_leaf, mask_leaf,
                                                geometry, rows.dtype)
                cols = F.embedding_bag(index, rows_leaf, per_sample_weights=tap_weight,
                                       mode='sum')
            if need_weight:
                grad_kernel.addmm_(go, cols.detach().view(p1 - p0, taps * ci))
            grad_cols = None
            leaves = [(leaf, dst) for leaf, dst in (
                (off_leaf, grad_offsets[t]), (mask_leaf, grad_masks[t]),
                (rows_leaf, grad_rows)) if leaf.requires_grad]
            if leaves:
                grad_cols = torch.mm(go.t(), kernel).view(-1, ci)
                got = torch.autograd.grad(cols, [leaf for leaf, _ in leaves], grad_cols)
                for (leaf, dst), g in zip(leaves, got):
                    if leaf is rows_leaf:
                        dst += g
                    else:
                        dst[s, :, p0:p1] = g
            if need_rows and on_cpu:
                if grad_cols is None:
                    grad_cols = torch.mm(go.t(), kernel).view(-1, ci)
                _scatter_rows(grad_rows, index, tap_weight.detach(), grad_cols)
        grad_weight = None
        if need_weight:
            grad_weight = grad_kernel.view(co, kh, kw, ci).permute(0, 3, 1, 2).contiguous()
        grad_maps, row0 = [], 0
        for m, n in zip(maps, need_maps):
            b, c, h, w = m.shape
            if n:
                grad_maps.append(grad_rows[row0:row0 + b * h * w].view(b, h, w, c)
                                 .permute(0, 3, 1, 2).to(m.dtype))
            else:
                grad_maps.append(None)
            row0 += b * h * w
        return (None, grad_weight, None, None, None, *grad_maps, *grad_offsets,
                *grad_masks)


def gather_conv(rows: Tensor, maps: Sequence[Tensor], terms: Sequence[SampledMap],
                offsets: Sequence[Tensor], masks: Sequence[Tensor],
                weight: Tensor, kernel_size: Tuple[int, int],
                stride: Tuple[int, int], padding: Tuple[int, int],
                dilation: Tuple[int, int]) -> List[Tensor]:
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
    terms = tuple(SampledMap(int(t.row_base), tuple(int(v) for v in t.in_size),
                             tuple(int(v) for v in t.out_size)) for t in terms)
    geometry = tuple(tuple(int(v) for v in g)
                     for g in (kernel_size, stride, padding, dilation))
    flat = [o.reshape(o.shape[0], o.shape[1], -1) for o in (*offsets, *masks)]
    return list(GatherConvFunction.apply(rows.detach(), weight, terms, geometry,
                                         len(maps), *maps, *flat))


def apply_bias(outs: List[Tensor], bias: Optional[Tensor]) -> List[Tensor]:
    if bias is None:
        return outs
    return [o + bias.to(o.dtype).view(1, -1, 1, 1) for o in outs]
