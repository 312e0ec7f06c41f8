"""How the package's DCN operator is written into ONNX graphs:
``DeformConv`` or ``grid_sample``.

The model calls ``mmdet_dyhead::modulated_deform_conv2d`` (one node per
deformable conv, :mod:`mmdet_dyhead.ops.dcn_op`), which the TorchScript
ONNX exporter has no symbolic for. :func:`onnx_dcn_export` wraps an export:
for its duration a torch function mode replaces every call of the operator
by one of two forms, traced like any other code:

- ``'deform_conv'`` (:func:`export_deform_conv2d`): one ONNX ``DeformConv``
  node (opset >= 19).
- ``'grid_sample'`` (:func:`grid_sample_deform_conv2d`): one
  ``grid_sample`` of all taps, the mask multiply and one matrix product;
  standard ops that every runtime understands.

Outside the block nothing is replaced, and nothing in ``mmdet_dyhead.ops``
knows about exporting.
"""

import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from mmdet_dyhead.ops import modulated_deform_conv2d_op
from mmdet_dyhead.utils.misc import check_choice

# How the native DCN is written into an ONNX graph (see onnx_dcn_export).
ONNX_DCN_FORMS = ('deform_conv', 'grid_sample')
# ONNX added the DeformConv operator in opset 19.
DEFORM_CONV_MIN_OPSET = 19

_Pair = Tuple[int, int]


def grid_sample_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: _Pair,
    padding: _Pair,
    dilation: _Pair,
) -> Tensor:
    """DCNv2 from standard ops only.

    One ``grid_sample`` of all taps, the mask multiply and one matrix
    product; ONNX exporters and mmengine's FLOP counter understand every op
    (the matrix product is the conv's MAC count).

    Args:
        input (Tensor): (N, C_in, H, W).
        offset (Tensor): (N, 2 * kh * kw, H_out, W_out), (dy, dx) per tap.
        mask (Tensor): (N, kh * kw, H_out, W_out).
        weight (Tensor): (C_out, C_in, kh, kw).
        bias (Tensor, optional): (C_out,).
        stride, padding, dilation (tuple[int, int]): As in ``conv2d``.

    Returns:
        Tensor: (N, C_out, H_out, W_out).
    """
    n, c, h, w = input.shape
    co, _, kh, kw = weight.shape
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    ho, wo = offset.shape[-2:]
    taps = kh * kw
    # Sampling grids are built in float32 (or float64) even under autocast:
    # half-precision pixel coordinates lose whole pixels on large maps.
    coord_dtype = (
        torch.float64 if input.dtype == torch.float64 else torch.float32
    )
    kw_dev = dict(dtype=coord_dtype, device=input.device)
    tap_y = (torch.arange(kh, **kw_dev) * dh).repeat_interleave(kw)
    tap_x = (torch.arange(kw, **kw_dev) * dw).repeat(kh)
    base_y = (torch.arange(ho, **kw_dev) * sh - ph).view(
        1, 1, ho, 1
    ) + tap_y.view(1, taps, 1, 1)
    base_x = (torch.arange(wo, **kw_dev) * sw - pw).view(
        1, 1, 1, wo
    ) + tap_x.view(1, taps, 1, 1)
    offset = offset.to(coord_dtype).view(n, taps, 2, ho, wo)
    pos_y = base_y + offset[:, :, 0]
    pos_x = base_x + offset[:, :, 1]
    # grid_sample's align_corners=False maps g -> ((g + 1) * size - 1) / 2,
    # i.e. pixel p is at g = (2p + 1) / size - 1; unlike align_corners=True
    # this is defined for size 1. Zero padding matches mmcv's bilinear rule
    # (corners outside the map contribute 0).
    grid = torch.stack(
        ((2 * pos_x + 1) / w - 1, (2 * pos_y + 1) / h - 1), dim=-1
    ).view(n, taps * ho, wo, 2)
    # Sample in the coordinate dtype: a bfloat16 grid would round positions
    # to whole pixels on large maps (8 mantissa bits).
    sampled = F.grid_sample(
        input.to(coord_dtype),
        grid,
        mode='bilinear',
        padding_mode='zeros',
        align_corners=False,
    ).to(input.dtype)  # (n, c, taps * ho, wo)
    columns = sampled.view(n, c, taps, ho * wo) * mask.to(
        sampled.dtype
    ).reshape(n, 1, taps, ho * wo)
    out = torch.matmul(
        weight.view(co, c * taps), columns.view(n, c * taps, ho * wo)
    )
    if bias is not None:
        out = out + bias.view(1, co, 1)
    return out.view(n, co, ho, wo)


class _OnnxDeformConv(torch.autograd.Function):
    """DCNv2 that the TorchScript ONNX exporter writes as one ``DeformConv``.

    Used only inside ``torch.onnx.export`` (see :func:`onnx_dcn_export`).
    The tracer records ``apply`` as a single node and the exporter asks
    :meth:`symbolic` for its ONNX form. The values the trace carries on are
    computed by the caller (``result``, the ``grid_sample`` form of the same
    function) and only passed through here: ops traced inside ``forward``
    land in a subgraph on which torch's peephole pass fails for identity
    arithmetic such as ``x * 1`` (pytorch/pytorch#97160), which stride 1 and
    dilation 1 produce. The symbolic does not use ``result``, so the
    exporter removes its ops as dead code. No backward: export only.
    """

    @staticmethod
    def forward(
        ctx,
        input,
        weight,
        offset,
        bias,
        mask,
        result,
        kernel_size,
        stride,
        padding,
        dilation,
    ):
        return result.clone()

    @staticmethod
    def symbolic(
        g,
        input,
        weight,
        offset,
        bias,
        mask,
        result,
        kernel_size,
        stride,
        padding,
        dilation,
    ):
        ph, pw = padding
        # ONNX's offset layout is mmcv's, (y, x) per tap with taps in
        # row-major order, so offsets and masks pass through as they are.
        # One weight group and one offset group, as in DyHead.
        return g.op(
            'DeformConv',
            input,
            weight,
            offset,
            bias,
            mask,
            dilations_i=list(dilation),
            group_i=1,
            offset_group_i=1,
            kernel_shape_i=list(kernel_size),
            pads_i=[ph, pw, ph, pw],
            strides_i=list(stride),
        )


def export_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: _Pair,
    padding: _Pair,
    dilation: _Pair,
) -> Tensor:
    """One map's DCN as one ONNX ``DeformConv`` node (inside an export).

    Args: as :func:`grid_sample_deform_conv2d`.

    Returns:
        Tensor: (N, C_out, H_out, W_out).
    """
    # The grid_sample form casts its operands with .to(), which returns
    # the same tensor when the dtype already matches; the tracer then
    # binds that tensor to the Cast's output and DeformConv would read
    # through three no-op Casts. Views give it tensors of its own.
    result = grid_sample_deform_conv2d(
        input.view_as(input),
        offset.view_as(offset),
        mask.view_as(mask),
        weight,
        bias,
        stride,
        padding,
        dilation,
    )
    if bias is None:
        # ONNX's B is optional, but omitting it before mask needs an
        # empty-name input; a zero bias (one small constant) keeps the
        # symbolic to plain graph ops.
        bias = weight.new_zeros(weight.shape[0])
    return _OnnxDeformConv.apply(
        input,
        weight,
        offset,
        bias,
        mask,
        result,
        # Fixed by the weight's shape: a constant, as the tracer warns.
        tuple(int(k) for k in weight.shape[-2:]),
        tuple(stride),
        tuple(padding),
        tuple(dilation),
    )


_FORMS = {
    'deform_conv': export_deform_conv2d,
    'grid_sample': grid_sample_deform_conv2d,
}


class _DCNExportMode(TorchFunctionMode):
    """Calls of the DCN operator become ``form``; all else runs as is."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.write = _FORMS[form]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is modulated_deform_conv2d_op._opoverload:
            input, offset, mask, weight, bias, sh, sw, ph, pw, dh, dw = args
            return self.write(
                input,
                offset,
                mask,
                weight,
                bias,
                (sh, sw),
                (ph, pw),
                (dh, dw),
            )
        return func(*args, **kwargs)


@contextlib.contextmanager
def onnx_dcn_export(form: str = 'deform_conv'):
    """Write the package's DCN layers in ``form`` while exporting to ONNX.

    Wrap a ``torch.onnx.export`` call (TorchScript exporter) in it:

    - ``'deform_conv'``: one ONNX ``DeformConv`` node per layer (opset
      >= 19; onnxruntime >= 1.25 runs it on CPU). About a third of the nodes
      of the other form and faster in onnxruntime.
    - ``'grid_sample'``: ``GridSample`` + ``Mul`` + ``MatMul`` and index
      arithmetic (opset >= 16), for runtimes without ``DeformConv``.

    Outside the block the exporter meets the operator
    ``mmdet_dyhead::modulated_deform_conv2d`` itself and stops with its
    "unsupported operator" error. Nothing changes outside the ``with``
    block; the mode is per thread and removed on exit, also when the
    export raises.

    Args:
        form (str): One of :data:`ONNX_DCN_FORMS`.
    """
    check_choice('dcn_export', form, ONNX_DCN_FORMS)
    with _DCNExportMode(form):
        yield
