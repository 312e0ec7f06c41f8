"""Modulated deformable convolution (DCNv2): one entry, two backends.

:func:`deform_conv2d` applies one DCNv2 layer (one weight) to a list of
maps, each with its own offsets and masks, and returns one output per map;
:func:`modulated_deform_conv2d` is the same for a single map, with mmcv's
signature. Backends:

- ``'torch'`` (and ``'auto'``): the package's operator
  ``mmdet_dyhead::modulated_deform_conv2d`` (:mod:`.dcn_op`), one node per
  map: the compiled CPU extension or the pure-PyTorch gather
  implementation on CPU, mmcv's kernel on CUDA. Compilers and exporters
  see that node; :mod:`mmdet_dyhead.deploy.dcn_onnx` writes it into ONNX
  graphs.
- ``'mmcv'``: mmcv's own ``modulated_deform_conv2d`` autograd function
  (CUDA and CPU kernels), one call per map.

Offsets use mmcv's layout, which is also ONNX ``DeformConv``'s: channel
``2k`` is the row (y) shift and ``2k + 1`` the column (x) shift of kernel
tap ``k = i * kw + j``.
"""

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from mmdet_dyhead.utils.misc import check_choice

from .dcn_op import modulated_deform_conv2d_op

DCN_BACKENDS = ('auto', 'mmcv', 'torch')

_IntPair = Union[int, Tuple[int, int]]


def _pair(value: _IntPair) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def mmcv_ops_available() -> bool:
    """Whether mmcv was built with its compiled ops (``mmcv._ext``)."""
    try:
        import mmcv._ext  # noqa: F401
    except Exception:  # ImportError, or a broken build raising OSError
        return False
    return True


def resolve_dcn_backend(backend: str, device: torch.device) -> str:
    """Map ``'auto'`` to a concrete backend for tensors on ``device``.

    ``auto`` is the package's operator (``'torch'``) on every device: it
    runs mmcv's kernel itself on CUDA and, unlike mmcv's autograd function,
    stays one node under ``torch.compile`` and ``torch.export``.
    """
    check_choice('dcn_backend', backend, DCN_BACKENDS)
    if backend == 'auto':
        return 'torch'
    if backend == 'mmcv' and not mmcv_ops_available():
        raise RuntimeError(
            "dcn_backend='mmcv' needs mmcv built with its compiled ops "
            '(mmcv._ext is missing). Rebuild mmcv with `pip install '
            "--no-build-isolation mmcv==2.1.0` or use dcn_backend='torch'."
        )
    return backend


def deform_conv_output_size(
    size: Tuple[int, int],
    kernel_size: _IntPair,
    stride: _IntPair,
    padding: _IntPair,
    dilation: _IntPair,
) -> Tuple[int, int]:
    """Spatial output size of a convolution with these settings."""
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    h, w = size
    return (
        (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
        (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1,
    )


def _check_shapes(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    stride,
    padding,
    dilation,
) -> None:
    if input.dim() != 4:
        raise ValueError(
            f'DCN input must be (N, C, H, W), got {tuple(input.shape)}.'
        )
    co, ci, kh, kw = weight.shape
    if input.shape[1] != ci:
        raise ValueError(
            f'DCN input has {input.shape[1]} channels but the weight expects '
            f'{ci}; set in_channels={input.shape[1]} or fix the feature '
            f'producer.'
        )
    taps = kh * kw
    ho, wo = deform_conv_output_size(
        input.shape[-2:], (kh, kw), stride, padding, dilation
    )
    n = input.shape[0]
    want_off = (n, 2 * taps, ho, wo)
    want_mask = (n, taps, ho, wo)
    if tuple(offset.shape) != want_off or tuple(mask.shape) != want_mask:
        raise ValueError(
            f'DCN offset/mask shapes {tuple(offset.shape)}/'
            f'{tuple(mask.shape)} do not match the output grid: expected '
            f'{want_off}/{want_mask} for input {tuple(input.shape)}, stride '
            f'{stride}. Offsets must be given at the output resolution.'
        )


def _autocast_enabled(device_type: str) -> bool:
    try:  # torch >= 2.4 takes the device type
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        if device_type == 'cuda':
            return torch.is_autocast_enabled()
        return torch.is_autocast_cpu_enabled()


def _op_deform_conv2d(
    input, offset, mask, weight, bias, stride, padding, dilation
) -> Tensor:
    """One map through ``mmdet_dyhead::modulated_deform_conv2d``."""
    device_type = input.device.type
    geometry = (*stride, *padding, *dilation)
    if not _autocast_enabled(device_type):
        dtype = input.dtype
        return modulated_deform_conv2d_op(
            input,
            offset,
            mask,
            weight.to(dtype),
            None if bias is None else bias.to(dtype),
            *geometry,
        )
    # The casts happen out here so autograd converts the gradients back;
    # the operator runs in one dtype with autocast off. On CUDA that is
    # float32 (mmcv's kernel has no bfloat16); offsets keep their dtype
    # (sampling positions are computed in float32 at least).
    dtype = torch.get_autocast_dtype(device_type)
    if device_type == 'cuda' or input.dtype not in (
        torch.float32,
        torch.float64,
    ):
        dtype = torch.float32 if device_type == 'cuda' else input.dtype
    with torch.autocast(device_type=device_type, enabled=False):
        return modulated_deform_conv2d_op(
            input.to(dtype),
            offset,
            mask,
            weight.to(dtype),
            None if bias is None else bias.to(dtype),
            *geometry,
        )


def _mmcv_deform_conv2d(
    input, offset, mask, weight, bias, stride, padding, dilation
) -> Tensor:
    from mmcv.ops import modulated_deform_conv2d as mmcv_mdconv

    device_type = input.device.type
    if _autocast_enabled(device_type):
        # mmcv's kernels have no autocast rules and need one dtype for all
        # operands; run them in float32 (the CPU kernel has no bfloat16).
        with torch.autocast(device_type=device_type, enabled=False):
            return mmcv_mdconv(
                input.float().contiguous(),
                offset.float().contiguous(),
                mask.float().contiguous(),
                weight.float(),
                None if bias is None else bias.float(),
                stride,
                padding,
                dilation,
                1,
                1,
            )
    dtype = input.dtype
    return mmcv_mdconv(
        input.contiguous(),
        offset.to(dtype).contiguous(),
        mask.to(dtype).contiguous(),
        weight.to(dtype),
        None if bias is None else bias.to(dtype),
        stride,
        padding,
        dilation,
        1,
        1,
    )


def deform_conv2d(
    maps: Sequence[Tensor],
    offsets: Sequence[Tensor],
    masks: Sequence[Tensor],
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: _IntPair = 1,
    padding: _IntPair = 1,
    dilation: _IntPair = 1,
    backend: str = 'auto',
    sources: Optional[Sequence[int]] = None,
) -> List[Tensor]:
    """One DCNv2 layer on several maps: for each term ``t`` reading map
    ``x = maps[sources[t]]``, ``y_t(p) = sum_k w_k * x(p + p_k + dp_k) * m_k
    (+ b)`` with ``dp = offsets[t]`` and ``m = masks[t]``.

    Maps may differ in size (a DyHead branch on every pyramid level). Each
    term is one call of the operator (or of mmcv's function), so a term's
    result does not depend on the other terms of the call.

    Args:
        maps (Sequence[Tensor]): Maps (N, C_in, H_i, W_i), same N and C_in.
        offsets (Sequence[Tensor]): Per term, the sampling shifts at its
            output grid, (N, 2 * kh * kw, H_out_t, W_out_t), (dy, dx) per
            tap.
        masks (Sequence[Tensor]): Per term, the modulation scalars,
            (N, kh * kw, H_out_t, W_out_t), usually in [0, 1].
        weight (Tensor): Kernel, shape (C_out, C_in, kh, kw).
        bias (Tensor, optional): Shape (C_out,).
        stride, padding, dilation (int | tuple[int, int]): As in ``conv2d``.
        backend (str): ``'auto'``, ``'mmcv'`` or ``'torch'``; see
            :func:`resolve_dcn_backend`.
        sources (Sequence[int], optional): The map each term reads; by
            default term ``t`` reads map ``t``.

    Returns:
        list[Tensor]: One (N, C_out, H_out_t, W_out_t) map per term.
    """
    if sources is None:
        sources = range(len(offsets))
    inputs = [maps[s] for s in sources]
    if not (len(inputs) == len(offsets) == len(masks)):
        raise ValueError(
            f'deform_conv2d needs one offset and one mask per term, got '
            f'{len(inputs)} terms, {len(offsets)} offsets, {len(masks)} '
            f'masks.'
        )
    if not inputs:
        check_choice('dcn_backend', backend, DCN_BACKENDS)
        return []
    backend = resolve_dcn_backend(backend, inputs[0].device)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    conv = _mmcv_deform_conv2d if backend == 'mmcv' else _op_deform_conv2d
    outs = []
    for x, off, msk in zip(inputs, offsets, masks):
        _check_shapes(x, off, msk, weight, stride, padding, dilation)
        outs.append(conv(x, off, msk, weight, bias, stride, padding, dilation))
    return outs


def modulated_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: _IntPair = 1,
    padding: _IntPair = 1,
    dilation: _IntPair = 1,
    backend: str = 'auto',
) -> Tensor:
    """DCNv2 on one map, with the argument order of mmcv's function.

    :func:`deform_conv2d` with a single map.

    Args:
        input (Tensor): Feature map, shape (N, C_in, H, W).
        offset (Tensor): Sampling shifts at the output grid,
            shape (N, 2 * kh * kw, H_out, W_out), (dy, dx) per tap.
        mask (Tensor): Modulation scalars, shape (N, kh * kw, H_out, W_out),
            usually in [0, 1] (sigmoid of a conv output).
        weight (Tensor): Kernel, shape (C_out, C_in, kh, kw).
        bias (Tensor, optional): Shape (C_out,).
        stride, padding, dilation (int | tuple[int, int]): As in ``conv2d``.
        backend (str): ``'auto'``, ``'mmcv'`` or ``'torch'``; see
            :func:`resolve_dcn_backend`.

    Returns:
        Tensor: Shape (N, C_out, H_out, W_out).
    """
    return deform_conv2d(
        [input],
        [offset],
        [mask],
        weight,
        bias,
        stride,
        padding,
        dilation,
        backend,
    )[0]


class ModulatedDeformConv(nn.Module):
    """Parameters of a DCNv2 layer; offsets and masks come from the caller.

    Parameter names and shapes (``weight``, ``bias``) are those of mmcv's
    ``ModulatedDeformConv2d``, so state dicts are interchangeable.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        kernel_size (int): Square kernel size. Default: 3.
        stride (int): Stride. Default: 1.
        padding (int): Zero padding. Default: 1.
        dilation (int): Dilation. Default: 1.
        bias (bool): Whether to learn a bias. Default: False.
        backend (str): DCN backend, ``'auto'|'mmcv'|'torch'``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        bias: bool = False,
        backend: str = 'auto',
    ) -> None:
        super().__init__()
        check_choice('dcn_backend', backend, DCN_BACKENDS)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.backend = backend
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels, *self.kernel_size)
        )
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The initialisation mmcv's ModulatedDeformConv2d uses.
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        stdv = 1.0 / math.sqrt(fan_in)
        self.weight.data.uniform_(-stdv, stdv)
        if self.bias is not None:
            self.bias.data.zero_()

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        """DCNv2 of one map; shapes as in :func:`modulated_deform_conv2d`."""
        return self.forward_maps([x], [offset], [mask])[0]

    def forward_maps(
        self,
        maps: Sequence[Tensor],
        offsets: Sequence[Tensor],
        masks: Sequence[Tensor],
        sources: Optional[Sequence[int]] = None,
    ) -> List[Tensor]:
        """This layer on several maps; arguments as in
        :func:`deform_conv2d`."""
        return deform_conv2d(
            maps,
            offsets,
            masks,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.backend,
            sources,
        )

    def extra_repr(self) -> str:
        return (
            f'{self.in_channels}, {self.out_channels}, '
            f'kernel_size={self.kernel_size}, stride={self.stride}, '
            f'padding={self.padding}, bias={self.bias is not None}, '
            f'backend={self.backend!r}'
        )
