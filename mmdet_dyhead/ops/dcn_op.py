"""The package's DCNv2 operator, ``mmdet_dyhead::modulated_deform_conv2d``.

Registered with :mod:`torch.library` when :mod:`mmdet_dyhead.ops` is
imported, in the package's own namespace (like a registry entry: no torch
operator is changed). Eager mode, ``torch.compile`` and ``torch.export``
all see one node per deformable conv of one map, so compiling never swaps
the formulation and every device keeps its kernel:

- CPU: the package's compiled kernel (the optional extension
  ``mmdet_dyhead._ext``) when it imports and the operands are one float32
  or float64 dtype, else the pure-PyTorch gather implementation
  (:mod:`.gather_conv`). :func:`dcn_cpu_implementation` says which;
  ``MMDET_DYHEAD_DCN_CPU=torch`` forces the pure-PyTorch one.
- CUDA: mmcv's kernel (``mmcv._ext``), or the pure-PyTorch implementation
  when mmcv was built without its ops.
- Any other device: the pure-PyTorch implementation.
- Fake (meta) tensors: shapes only, for tracing and compiling.

Autograd runs the backward operator
``mmdet_dyhead::modulated_deform_conv2d_backward`` (input, offset, mask and
weight gradients from the same implementation; the bias gradient is the sum
of the output gradient). Only DyHead's configuration is implemented: one
weight group and one offset group. Offsets use mmcv's layout (channel
``2k`` is the row shift, ``2k + 1`` the column shift of tap
``k = i * kw + j``); sampling outside the map reads zeros.
"""

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .gather_conv import gather_conv_backward, gather_conv_forward

OP_NAME = 'mmdet_dyhead::modulated_deform_conv2d'
BACKWARD_OP_NAME = 'mmdet_dyhead::modulated_deform_conv2d_backward'
# Set to 'torch' to run the pure-PyTorch CPU implementation even when the
# compiled extension is installed.
CPU_IMPL_ENV = 'MMDET_DYHEAD_DCN_CPU'
DCN_CPU_IMPLEMENTATIONS = ('cpp', 'torch')


def _load_extension():
    try:
        from mmdet_dyhead import _ext
    except (ImportError, OSError):  # not built, or a broken build
        return None
    return _ext


_EXT = _load_extension()


def _forced_cpu_implementation() -> Optional[str]:
    forced = os.environ.get(CPU_IMPL_ENV, '')
    if forced and forced not in DCN_CPU_IMPLEMENTATIONS:
        raise ValueError(
            f'{CPU_IMPL_ENV}={forced!r} is not a DCN CPU implementation; '
            f'use one of {DCN_CPU_IMPLEMENTATIONS} or unset it.'
        )
    return forced or None


def dcn_cpu_implementation() -> str:
    """Which implementation the operator runs on CPU float32/float64.

    Returns:
        str: ``'cpp'`` (the compiled extension ``mmdet_dyhead._ext``) or
        ``'torch'`` (the pure-PyTorch one: the extension is not installed,
        or ``MMDET_DYHEAD_DCN_CPU=torch`` asks for it). Other dtypes
        (bfloat16 under autocast) always run the pure-PyTorch one.

    Raises:
        RuntimeError: ``MMDET_DYHEAD_DCN_CPU=cpp`` without the extension.
    """
    forced = _forced_cpu_implementation()
    if forced == 'torch':
        return 'torch'
    if _EXT is None:
        if forced == 'cpp':
            raise RuntimeError(
                f'{CPU_IMPL_ENV}=cpp but the compiled DCN extension '
                '(mmdet_dyhead._ext) is not installed; reinstall the '
                'package with a C++ compiler on PATH (scripts/install.sh) '
                f'or unset {CPU_IMPL_ENV}.'
            )
        return 'torch'
    return 'cpp'


def _geometry(args) -> Tuple[Tuple[int, int], ...]:
    sh, sw, ph, pw, dh, dw = (int(a) for a in args)
    return (sh, sw), (ph, pw), (dh, dw)


def _check_operands(input, offset, mask, weight) -> None:
    """Refuse what the implementations do not compute (mmcv's groups)."""
    if input.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f'{OP_NAME} takes an (N, C, H, W) input and a (C_out, C_in, kh, '
            f'kw) weight, got {tuple(input.shape)} and '
            f'{tuple(weight.shape)}.'
        )
    taps = weight.shape[2] * weight.shape[3]
    if weight.shape[1] != input.shape[1]:
        raise ValueError(
            f'{OP_NAME} implements one weight group: the weight '
            f'{tuple(weight.shape)} must have C_in = {input.shape[1]}, the '
            'input channels (groups > 1 is not supported).'
        )
    if offset.shape[1] != 2 * taps or mask.shape[1] != taps:
        raise ValueError(
            f'{OP_NAME} implements one offset group: offset and mask need '
            f'{2 * taps} and {taps} channels for a '
            f'{weight.shape[2]}x{weight.shape[3]} kernel, got '
            f'{offset.shape[1]} and {mask.shape[1]} (deform_groups > 1 is '
            'not supported).'
        )


def _output_shape(input, offset, weight):
    return (input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3])


# ---------------------------------------------------------------- torch ---
def _torch_forward(input, offset, mask, weight, bias, *geometry):
    _check_operands(input, offset, mask, weight)
    out = gather_conv_forward(
        input, offset, mask, weight.to(input.dtype), *_geometry(geometry)
    )
    if bias is not None:
        out += bias.to(out.dtype).reshape(1, -1, 1, 1)
    return out


def _torch_backward(grad_out, input, offset, mask, weight, *geometry):
    return gather_conv_backward(
        grad_out, input, offset, mask, weight, *_geometry(geometry)
    )


# ------------------------------------------------------------------ cpp ---
def _cpp_applies(*tensors) -> bool:
    dtypes = {t.dtype for t in tensors if t is not None}
    return len(dtypes) == 1 and dtypes <= {torch.float32, torch.float64}


def _cpu_forward(input, offset, mask, weight, bias, *geometry):
    _check_operands(input, offset, mask, weight)
    if dcn_cpu_implementation() == 'cpp' and _cpp_applies(
        input, offset, mask, weight, bias
    ):
        return _EXT.dcn_forward(
            input.contiguous(),
            offset.contiguous(),
            mask.contiguous(),
            weight.contiguous(),
            None if bias is None else bias.contiguous(),
            *(int(g) for g in geometry),
        )
    return _torch_forward(input, offset, mask, weight, bias, *geometry)


def _cpu_backward(grad_out, input, offset, mask, weight, *geometry):
    if dcn_cpu_implementation() == 'cpp' and _cpp_applies(
        grad_out, input, offset, mask, weight
    ):
        return tuple(
            g.contiguous()  # what the fake implementation promises
            for g in _EXT.dcn_backward(
                grad_out.contiguous(),
                input.contiguous(),
                offset.contiguous(),
                mask.contiguous(),
                weight.contiguous(),
                *(int(g) for g in geometry),
            )
        )
    return _torch_backward(grad_out, input, offset, mask, weight, *geometry)


# ----------------------------------------------------------------- mmcv ---
def _mmcv_ext():
    try:
        import mmcv._ext as ext
    except Exception:  # ImportError, or a broken build raising OSError
        return None
    return ext


def _mmcv_kwargs(weight, geometry, with_bias):
    sh, sw, ph, pw, dh, dw = (int(g) for g in geometry)
    return dict(
        kernel_h=weight.shape[2],
        kernel_w=weight.shape[3],
        stride_h=sh,
        stride_w=sw,
        pad_h=ph,
        pad_w=pw,
        dilation_h=dh,
        dilation_w=dw,
        group=1,
        deformable_group=1,
        with_bias=with_bias,
    )


def mmcv_kernel_forward(input, offset, mask, weight, bias, *geometry):
    """Forward through mmcv's compiled kernel (its CUDA or CPU build).

    mmcv's kernel needs one dtype for all operands: offsets, masks, weight
    and bias are cast to ``input``'s.
    """
    ext = _mmcv_ext()
    dtype = input.dtype
    out = input.new_empty(_output_shape(input, offset, weight))
    ext.modulated_deform_conv_forward(
        input.contiguous(),
        weight.to(dtype).contiguous(),
        input.new_empty(0) if bias is None else bias.to(dtype).contiguous(),
        input.new_empty(0),  # mmcv's scratch buffers
        offset.to(dtype).contiguous(),
        mask.to(dtype).contiguous(),
        out,
        input.new_empty(0),
        **_mmcv_kwargs(weight, geometry, bias is not None),
    )
    return out


def mmcv_kernel_backward(grad_out, input, offset, mask, weight, *geometry):
    """Input, offset, mask and weight gradients from mmcv's kernel."""
    ext = _mmcv_ext()
    dtype = input.dtype
    input = input.contiguous()
    offset_c = offset.to(dtype).contiguous()
    mask_c = mask.to(dtype).contiguous()
    weight_c = weight.to(dtype).contiguous()
    grads = [torch.zeros_like(t) for t in (input, offset_c, mask_c, weight_c)]
    empty = input.new_empty(0)
    ext.modulated_deform_conv_backward(
        input,
        weight_c,
        empty,  # bias: its gradient is taken by the autograd rule
        input.new_empty(0),
        offset_c,
        mask_c,
        input.new_empty(0),
        grads[0],
        grads[3],
        input.new_empty(0),
        grads[1],
        grads[2],
        grad_out.to(dtype).contiguous(),
        **_mmcv_kwargs(weight, geometry, False),
    )
    return (
        grads[0],
        grads[1].to(offset.dtype),
        grads[2].to(mask.dtype),
        grads[3].to(weight.dtype),
    )


def _cuda_forward(input, offset, mask, weight, bias, *geometry):
    _check_operands(input, offset, mask, weight)
    if _mmcv_ext() is None:
        return _torch_forward(input, offset, mask, weight, bias, *geometry)
    return mmcv_kernel_forward(input, offset, mask, weight, bias, *geometry)


def _cuda_backward(grad_out, input, offset, mask, weight, *geometry):
    if _mmcv_ext() is None:
        return _torch_backward(
            grad_out, input, offset, mask, weight, *geometry
        )
    return mmcv_kernel_backward(
        grad_out, input, offset, mask, weight, *geometry
    )


# ------------------------------------------------------------ operators ---
@torch.library.custom_op(OP_NAME, mutates_args=())
def modulated_deform_conv2d_op(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dil_h: int,
    dil_w: int,
) -> Tensor:
    """DCNv2 of one map (one weight group, one offset group).

    Args:
        input (Tensor): (N, C_in, H, W).
        offset (Tensor): (N, 2K, H_out, W_out), (dy, dx) per tap.
        mask (Tensor): (N, K, H_out, W_out).
        weight (Tensor): (C_out, C_in, kh, kw), ``input``'s dtype.
        bias (Tensor, optional): (C_out,), ``input``'s dtype.
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w (int): Geometry.

    Returns:
        Tensor: (N, C_out, H_out, W_out) in ``input``'s dtype.
    """
    geometry = (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
    return _torch_forward(input, offset, mask, weight, bias, *geometry)


@torch.library.custom_op(BACKWARD_OP_NAME, mutates_args=())
def modulated_deform_conv2d_backward_op(
    grad_out: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dil_h: int,
    dil_w: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``input``, ``offset``, ``mask`` and ``weight``."""
    geometry = (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
    return _torch_backward(grad_out, input, offset, mask, weight, *geometry)


modulated_deform_conv2d_op.register_kernel('cpu')(_cpu_forward)
modulated_deform_conv2d_op.register_kernel('cuda')(_cuda_forward)
modulated_deform_conv2d_backward_op.register_kernel('cpu')(_cpu_backward)
modulated_deform_conv2d_backward_op.register_kernel('cuda')(_cuda_backward)


@modulated_deform_conv2d_op.register_fake
def _forward_fake(input, offset, mask, weight, bias, *geometry):
    _check_operands(input, offset, mask, weight)
    return input.new_empty(_output_shape(input, offset, weight))


@modulated_deform_conv2d_backward_op.register_fake
def _backward_fake(grad_out, input, offset, mask, weight, *geometry):
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format)
        for t in (input, offset, mask, weight)
    )


def _setup_context(ctx, inputs, output):
    input, offset, mask, weight, bias, *geometry = inputs
    ctx.save_for_backward(input, offset, mask, weight)
    ctx.geometry = geometry
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out):
    input, offset, mask, weight = ctx.saved_tensors
    grads = modulated_deform_conv2d_backward_op(
        grad_out.contiguous(), input, offset, mask, weight, *ctx.geometry
    )
    grad_bias = None
    if ctx.bias_dtype is not None:
        grad_bias = grad_out.sum((0, 2, 3)).to(ctx.bias_dtype)
    return (*grads, grad_bias, None, None, None, None, None, None)


modulated_deform_conv2d_op.register_autograd(
    _backward, setup_context=_setup_context
)
