"""Modulated deformable convolution (DCNv2) behind one function, two backends.

``'mmcv'`` calls mmcv's compiled ``modulated_deform_conv2d`` (CUDA and CPU
kernels). ``'torch'`` is a native PyTorch implementation: offsets and masks
become four (row, weight) bilinear corners per kernel tap
(:mod:`.bilinear_taps`), and a chunked gather + matrix product with its own
backward (:mod:`.gather_conv`) computes the conv; several maps sharing one
weight can go through one call (:func:`deform_conv2d_on_table`). While an
ONNX export runs, the layer becomes either ONNX's standard ``DeformConv``
node (opset >= 19, :func:`onnx_dcn_export`) or the same maths in
``grid_sample`` and ``matmul`` (:func:`_grid_sample_deform_conv2d`, the
default and what every other tracer sees). It needs no compiled op, is
differentiable, exports to ONNX and runs under autocast. All read offsets
in mmcv's layout, which is also ONNX ``DeformConv``'s: channel ``2k`` is the
row (y) shift and ``2k + 1`` the column (x) shift of kernel tap
``k = i * kw + j``.
"""

import contextlib
import contextvars
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .bilinear_taps import PixelTable, pixel_table
from .gather_conv import SampledMap, apply_bias, gather_conv

DCN_BACKENDS = ('auto', 'mmcv', 'torch')

# How the native DCN is written into an ONNX graph (see onnx_dcn_export).
ONNX_DCN_FORMS = ('deform_conv', 'grid_sample')
# ONNX added the DeformConv operator in opset 19.
DEFORM_CONV_MIN_OPSET = 19

# A context variable, not a module flag flipped by callers: the choice
# holds only inside ``with onnx_dcn_export(...)``, in that thread, and is
# restored on exit even when the export raises.
_onnx_dcn_form = contextvars.ContextVar(
    'mmdet_dyhead_onnx_dcn_form', default='grid_sample'
)

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

    ``auto`` picks mmcv's kernel on CUDA (where it is the fastest option) and
    the native path elsewhere: mmcv's CPU kernel is single-threaded and its
    backward costs about ten times its forward.
    """
    if backend not in DCN_BACKENDS:
        raise ValueError(
            f'dcn_backend={backend!r} does not exist; '
            f'choose one of {DCN_BACKENDS}.'
        )
    if backend == 'auto':
        if device.type == 'cuda' and mmcv_ops_available():
            return 'mmcv'
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


def _grid_sample_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride,
    padding,
    dilation,
) -> Tensor:
    """DCNv2 from standard ops only: the path taken while exporting.

    One ``grid_sample`` of all taps, the mask multiply and one matrix
    product; ONNX exporters and mmengine's FLOP counter understand every op
    (the matrix product is the conv's MAC count).
    """
    n, c, h, w = input.shape
    co, _, kh, kw = weight.shape
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
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


@contextlib.contextmanager
def onnx_dcn_export(form: str = 'deform_conv'):
    """Choose how native DCN layers are written while exporting to ONNX.

    Wrap a ``torch.onnx.export`` call (TorchScript exporter) in it:

    - ``'deform_conv'``: one ONNX ``DeformConv`` node per layer (opset
      >= 19; onnxruntime >= 1.25 runs it on CPU). About a third of the nodes
      of the other form and faster in onnxruntime.
    - ``'grid_sample'``: ``GridSample`` + ``Mul`` + ``MatMul`` and index
      arithmetic (opset >= 16), for runtimes without ``DeformConv``. Also
      what any export outside this context produces.

    Nothing changes outside the ``with`` block; the setting is per thread.

    Args:
        form (str): One of :data:`ONNX_DCN_FORMS`.
    """
    if form not in ONNX_DCN_FORMS:
        raise ValueError(
            f'DCN export form {form!r} does not exist; choose one of '
            f'{ONNX_DCN_FORMS}.'
        )
    token = _onnx_dcn_form.set(form)
    try:
        yield
    finally:
        _onnx_dcn_form.reset(token)


def _export_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride,
    padding,
    dilation,
) -> Tensor:
    """The layer's form while exporting: ``DeformConv`` or ``grid_sample``.

    Args:
        input (Tensor): (N, C_in, H, W).
        offset (Tensor): (N, 2 * kh * kw, H_out, W_out), (dy, dx) per tap.
        mask (Tensor): (N, kh * kw, H_out, W_out).
        weight (Tensor): (C_out, C_in, kh, kw).
        bias (Tensor, optional): (C_out,).
        stride, padding, dilation (int | tuple[int, int]): As in ``conv2d``.

    Returns:
        Tensor: (N, C_out, H_out, W_out).
    """
    if (
        torch.onnx.is_in_onnx_export()
        and _onnx_dcn_form.get() == 'deform_conv'
    ):
        # The grid_sample form casts its operands with .to(), which returns
        # the same tensor when the dtype already matches; the tracer then
        # binds that tensor to the Cast's output and DeformConv would read
        # through three no-op Casts. Views give it tensors of its own.
        result = _grid_sample_deform_conv2d(
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
            _pair(stride),
            _pair(padding),
            _pair(dilation),
        )
    return _grid_sample_deform_conv2d(
        input, offset, mask, weight, bias, stride, padding, dilation
    )


def exporting() -> bool:
    """Whether an exporter or compiler, which needs standard ops, is running.

    Plain ``torch.jit.trace`` (mmengine's FLOP counter) keeps the fast path:
    it records the autograd function as one op, which
    :mod:`mmdet_dyhead.utils.flops` counts.
    """
    if torch.onnx.is_in_onnx_export() or torch.jit.is_scripting():
        return True
    compiler = getattr(torch, 'compiler', None)
    return bool(compiler is not None and compiler.is_compiling())


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype autocast would run a convolution in, else ``t``'s."""
    device_type = t.device.type
    if _autocast_enabled(device_type) and t.dtype in (
        torch.float32,
        torch.float64,
    ):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


def deform_conv2d_on_table(
    table: PixelTable,
    sources: Sequence[int],
    offsets: Sequence[Tensor],
    masks: Sequence[Tensor],
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: _IntPair = 1,
    padding: _IntPair = 1,
    dilation: _IntPair = 1,
) -> List[Tensor]:
    """One DCNv2 (one weight) applied to several maps in a single call.

    Term ``t`` samples map ``sources[t]`` of ``table`` with ``offsets[t]``
    and ``masks[t]``. The gathers of all terms feed one chain of matrix
    products with the shared weight (see :mod:`.gather_conv`).

    Args:
        table (PixelTable): Maps to sample, from :func:`pixel_table`.
        sources (Sequence[int]): Map index of each term.
        offsets (Sequence[Tensor]): (N, 2K, H_out, W_out) per term.
        masks (Sequence[Tensor]): (N, K, H_out, W_out) per term.
        weight (Tensor): (C_out, C_in, kh, kw).
        bias (Tensor, optional): (C_out,).
        stride, padding, dilation (int | tuple[int, int]): As in ``conv2d``.

    Returns:
        list[Tensor]: (N, C_out, H_out, W_out) per term.
    """
    kernel_size = tuple(weight.shape[-2:])
    geometry = (kernel_size, _pair(stride), _pair(padding), _pair(dilation))
    terms = []
    for src, off, msk in zip(sources, offsets, masks):
        want = deform_conv_output_size(table.sizes[src], *geometry)
        ho, wo = off.shape[-2:]
        if (ho, wo) != tuple(want) or tuple(msk.shape[-2:]) != tuple(want):
            raise ValueError(
                f'DCN offset/mask shapes {tuple(off.shape)}/'
                f'{tuple(msk.shape)} do not match the output grid '
                f'{tuple(want)} of a map of size {table.sizes[src]}.'
            )
        terms.append(SampledMap(table.bases[src], table.sizes[src], (ho, wo)))
    # Casts happen out here so autograd converts the gradients back; the
    # function runs in one dtype with autocast off (it calls mm(out=...)).
    dtype = _compute_dtype(table.rows)
    device_type = table.rows.device.type
    if _autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            outs = gather_conv(
                table.rows.to(dtype),
                table.maps,
                terms,
                offsets,
                masks,
                weight.to(dtype),
                *geometry,
            )
    else:
        outs = gather_conv(
            table.rows,
            table.maps,
            terms,
            offsets,
            masks,
            weight.to(table.rows.dtype),
            *geometry,
        )
    return apply_bias(outs, bias)


def native_path_active(backend: str, input: Tensor) -> bool:
    """Whether ``backend`` on ``input`` runs the gather-based native path.

    Callers that batch several convolutions into one
    :func:`deform_conv2d_on_table` call use this to know when batching is
    possible (not for mmcv's kernel, nor while tracing).
    """
    return (
        resolve_dcn_backend(backend, input.device) == 'torch'
        and not exporting()
    )


def _native_modulated_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride,
    padding,
    dilation,
) -> Tensor:
    if exporting():
        return _export_deform_conv2d(
            input, offset, mask, weight, bias, stride, padding, dilation
        )
    return deform_conv2d_on_table(
        pixel_table([input]),
        [0],
        [offset],
        [mask],
        weight,
        bias,
        stride,
        padding,
        dilation,
    )[0]


def _autocast_enabled(device_type: str) -> bool:
    try:  # torch >= 2.4 takes the device type
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        if device_type == 'cuda':
            return torch.is_autocast_enabled()
        return torch.is_autocast_cpu_enabled()


def _mmcv_modulated_deform_conv2d(
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
    """DCNv2: ``y(p) = sum_k w_k * x(p + p_k + dp_k) * m_k (+ b)``.

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
    backend = resolve_dcn_backend(backend, input.device)
    _check_shapes(input, offset, mask, weight, stride, padding, dilation)
    if backend == 'mmcv':
        return _mmcv_modulated_deform_conv2d(
            input, offset, mask, weight, bias, stride, padding, dilation
        )
    return _native_modulated_deform_conv2d(
        input, offset, mask, weight, bias, stride, padding, dilation
    )


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
        if backend not in DCN_BACKENDS:
            raise ValueError(
                f'dcn_backend={backend!r} does not exist; '
                f'choose one of {DCN_BACKENDS}.'
            )
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
        return modulated_deform_conv2d(
            x,
            offset,
            mask,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f'{self.in_channels}, {self.out_channels}, '
            f'kernel_size={self.kernel_size}, stride={self.stride}, '
            f'padding={self.padding}, bias={self.bias is not None}, '
            f'backend={self.backend!r}'
        )
