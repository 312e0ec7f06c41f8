"""The package's DCNv2 operator against mmcv's compiled kernel, gradcheck
and torch.library's opcheck."""

import importlib.util

import pytest
import torch

from mmdet_dyhead.ops import (
    CPU_IMPL_ENV,
    ModulatedDeformConv,
    dcn_cpu_implementation,
    deform_conv2d,
    mmcv_ops_available,
    modulated_deform_conv2d,
    modulated_deform_conv2d_op,
    resolve_dcn_backend,
)
from tests.helpers import rel_err

needs_mmcv = pytest.mark.skipif(
    not mmcv_ops_available(), reason='mmcv built without ops'
)


def _inputs(
    n=2, c=8, co=6, h=11, w=13, stride=1, dtype=torch.float32, bias=True
):
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    x = torch.randn(n, c, h, w, dtype=dtype)
    # Offsets of a few pixels, some pointing outside the map, never integer.
    offset = (torch.rand(n, 18, ho, wo, dtype=dtype) - 0.5) * 6 + 0.013
    mask = torch.rand(n, 9, ho, wo, dtype=dtype)
    weight = torch.randn(co, c, 3, 3, dtype=dtype) * 0.1
    b = torch.randn(co, dtype=dtype) if bias else None
    return x, offset, mask, weight, b


@needs_mmcv
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('bias', [True, False])
def test_native_matches_mmcv_forward_and_every_gradient(stride, bias):
    from mmcv.ops import modulated_deform_conv2d as mmcv_dcn

    args = _inputs(stride=stride, bias=bias)
    leaves = [
        a.clone().requires_grad_() if a is not None else None for a in args
    ]
    ref_leaves = [
        a.clone().requires_grad_() if a is not None else None for a in args
    ]
    out = modulated_deform_conv2d(
        *leaves, stride=stride, padding=1, backend='torch'
    )
    x, off, m, wt, b = ref_leaves
    ref = mmcv_dcn(x, off, m, wt, b, stride, 1, 1, 1, 1)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-5
    grad_out = torch.randn_like(ref)
    out.backward(grad_out)
    ref.backward(grad_out)
    for name, ours, theirs in zip(
        ('input', 'offset', 'mask', 'weight', 'bias'), leaves, ref_leaves
    ):
        if ours is None:
            continue
        assert rel_err(ours.grad, theirs.grad) < 1e-5, name


# Sample positions on and next to the lines where mmcv's kernel changes
# rule: -1 and H (W) bound the taps that count, 0 and H - 1 (W - 1) are the
# last in-map pixels, integers are where the floor-based corners switch.
# Dyadic steps (2**-10) keep every position exact in float32 and float64.
_EPS = 2.0**-10


def _border_positions(size):
    return [
        -1.5,
        -1 - _EPS,
        -1.0,
        -1 + _EPS,
        -0.5,
        0.0,
        1.0,
        2.25,
        size - 1 - _EPS,
        size - 1.0,
        size - 1 + _EPS,
        size - _EPS,
        float(size),
        size + _EPS,
    ]


def _offsets_to(ty, tx, out_size, stride, dtype):
    """Offsets (1, 18, H_out, W_out) that move tap ``t`` of the 3x3, pad-1
    conv onto (ty[t], tx[t]), taps counted as ``(i * W_out + j) * 9 + k``.
    """
    ho, wo = out_size
    k = torch.arange(3, dtype=dtype)
    base_y = (torch.arange(ho, dtype=dtype) * stride - 1).view(ho, 1, 1)
    base_x = (torch.arange(wo, dtype=dtype) * stride - 1).view(1, wo, 1)
    base_y = (base_y + k.repeat_interleave(3)).expand(ho, wo, 9)
    base_x = (base_x + k.repeat(3)).expand(ho, wo, 9)
    dy = ty.view(ho, wo, 9) - base_y
    dx = tx.view(ho, wo, 9) - base_x
    # mmcv reads the raw buffer: hand it a contiguous (dy, dx) layout.
    off = torch.stack((dy, dx), -1).permute(2, 3, 0, 1)
    return off.reshape(1, 18, ho, wo).contiguous()


@needs_mmcv
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('stride', [1, 2])
def test_native_matches_mmcv_on_integer_and_border_positions(dtype, stride):
    """Every (y, x) pair of border and integer positions, through forward
    and all four gradients. mmcv gives a tap at y = -1 (or x = -1) no value
    and no gradient; the corner weights alone give its offset a one-sided
    slope there (the pixel row 0 has weight 0 but slope 1)."""
    from mmcv.ops import modulated_deform_conv2d as mmcv_dcn

    torch.manual_seed(0)
    h, w = 5, 6
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    pairs = torch.tensor(
        [(y, x) for y in _border_positions(h) for x in _border_positions(w)],
        dtype=dtype,
    )
    # Enough output pixels to hold every pair at least once.
    n = -(-len(pairs) // (ho * wo * 9))
    pick = torch.arange(n * ho * wo * 9) % len(pairs)
    offset = torch.cat(
        [
            _offsets_to(
                pairs[chunk, 0], pairs[chunk, 1], (ho, wo), stride, dtype
            )
            for chunk in pick.view(n, -1)
        ]
    )
    x = torch.randn(n, 3, h, w, dtype=dtype)
    mask = torch.rand(n, 9, ho, wo, dtype=dtype) + 0.5
    weight = torch.randn(4, 3, 3, 3, dtype=dtype)
    ours = [t.clone().requires_grad_() for t in (x, offset, mask, weight)]
    ref = [t.clone().requires_grad_() for t in (x, offset, mask, weight)]
    out = modulated_deform_conv2d(*ours, stride=stride, backend='torch')
    expected = mmcv_dcn(*ref, None, stride, 1, 1, 1, 1)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(out, expected) < tol
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    for name, a, b in zip(('input', 'offset', 'mask', 'weight'), ours, ref):
        assert b.grad.abs().max() > 0, name
        assert rel_err(a.grad, b.grad) < tol, name

    # The taps in question exist, and neither offset of a tap on y = -1 or
    # x = -1 gets a gradient.
    def per_tap(col):
        return pairs[pick, col].view(n, ho, wo, 9).permute(0, 3, 1, 2)

    on_line = (per_tap(0) == -1) | (per_tap(1) == -1)
    assert on_line.sum() >= 2 * len(_border_positions(h))
    offset_grad = ours[1].grad.view(n, 9, 2, ho, wo)
    assert (offset_grad.permute(0, 1, 3, 4, 2)[on_line] == 0).all()


@needs_mmcv
def test_mmcv_backend_dispatch_matches_native():
    args = _inputs()
    a = modulated_deform_conv2d(*args, backend='mmcv')
    b = modulated_deform_conv2d(*args, backend='torch')
    assert rel_err(a, b) < 1e-5


def test_native_gradcheck_float64():
    x, off, m, w, b = _inputs(n=1, c=2, co=2, h=5, w=6, dtype=torch.float64)
    tensors = [t.requires_grad_() for t in (x, off, m, w, b)]
    assert torch.autograd.gradcheck(
        lambda *t: modulated_deform_conv2d(*t, backend='torch'),
        tensors,
        eps=1e-6,
        atol=1e-5,
    )


def test_zero_offsets_and_unit_mask_is_a_plain_convolution():
    # Independent reference: with no deformation DCNv2 is conv2d.
    x, _, _, w, b = _inputs(h=9, w=7)
    for stride in (1, 2):
        conv = torch.nn.functional.conv2d(x, w, b, stride=stride, padding=1)
        ho, wo = conv.shape[-2:]
        out = modulated_deform_conv2d(
            x,
            torch.zeros(2, 18, ho, wo),
            torch.ones(2, 9, ho, wo),
            w,
            b,
            stride=stride,
            backend='torch',
        )
        assert rel_err(out, conv) < 1e-5


def test_integer_offset_is_a_shifted_convolution():
    # Shifting every tap by (+1 row, -2 cols) equals convolving the shifted
    # map.
    x, _, _, w, _ = _inputs(h=12, w=12, bias=False)
    off = torch.zeros(2, 18, 12, 12)
    off[:, 0::2] = 1.0
    off[:, 1::2] = -2.0
    out = modulated_deform_conv2d(
        x, off, torch.ones(2, 9, 12, 12), w, backend='torch'
    )
    shifted = torch.zeros_like(x)
    shifted[:, :, :-1, 2:] = x[:, :, 1:, :-2]
    ref = torch.nn.functional.conv2d(shifted, w, padding=1)
    # Compare away from the border, where zero padding differs.
    assert rel_err(out[..., 2:-2, 3:-3], ref[..., 2:-2, 3:-3]) < 1e-5


def test_bad_shapes_and_names_raise_clear_errors():
    x, off, m, w, b = _inputs()
    with pytest.raises(ValueError, match='offset/mask shapes'):
        modulated_deform_conv2d(x, off[..., :-1], m, w, b, backend='torch')
    with pytest.raises(ValueError, match='channels'):
        modulated_deform_conv2d(x[:, :4], off, m, w, b, backend='torch')
    with pytest.raises(ValueError, match="dcn_backend='cuda' does not exist"):
        modulated_deform_conv2d(x, off, m, w, b, backend='cuda')
    with pytest.raises(ValueError, match='does not exist'):
        ModulatedDeformConv(4, 4, backend='triton')


def test_auto_backend_is_the_operator_on_every_device():
    for device in ('cpu', 'cuda'):
        assert resolve_dcn_backend('auto', torch.device(device)) == 'torch'


def test_module_parameters_match_mmcv_names():
    from mmcv.ops import ModulatedDeformConv2d

    ours = ModulatedDeformConv(8, 4, bias=True).state_dict()
    theirs = ModulatedDeformConv2d(8, 4, 3, padding=1, bias=True).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {
        k: v.shape for k, v in theirs.items()
    }


@needs_mmcv
@pytest.mark.parametrize('stride', [1, 2])
def test_chunked_native_path_matches_mmcv(stride, monkeypatch):
    # Tiny chunks so every tensor is cut across chunk (and sample) borders.
    from mmcv.ops import modulated_deform_conv2d as mmcv_dcn

    import mmdet_dyhead.ops.gather_conv as gather_conv

    monkeypatch.setattr(gather_conv, 'CPU_CHUNK_PIXELS', 7)
    args = _inputs(n=2, h=13, w=10, stride=stride)
    leaves = [a.clone().requires_grad_() for a in args]
    ref_leaves = [a.clone().requires_grad_() for a in args]
    out = modulated_deform_conv2d(*leaves, stride=stride, backend='torch')
    ref = mmcv_dcn(*ref_leaves, stride, 1, 1, 1, 1)
    assert rel_err(out, ref) < 1e-5
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    for name, a, b in zip(
        ('input', 'offset', 'mask', 'weight', 'bias'), leaves, ref_leaves
    ):
        assert rel_err(a.grad, b.grad) < 1e-5, name


def _several_maps():
    maps = [
        torch.randn(2, 4, 12, 9),
        torch.randn(2, 4, 6, 5),
        torch.randn(2, 4, 3, 3),
    ]
    w = torch.randn(3, 4, 3, 3)
    offs = [torch.randn(2, 18, h, wd) for h, wd in ((6, 5), (3, 3), (2, 2))]
    masks = [torch.rand(2, 9, h, wd) for h, wd in ((6, 5), (3, 3), (2, 2))]
    return maps, offs, masks, w


def test_one_call_on_several_maps_equals_separate_calls():
    maps, offs, masks, w = _several_maps()
    # Stride 2: map i lands on the grid of map i+1 (the DyHead low branch).
    got = deform_conv2d(maps, offs, masks, w, stride=2, backend='torch')
    for m, o, k, g in zip(maps, offs, masks, got):
        ref = modulated_deform_conv2d(m, o, k, w, stride=2, backend='torch')
        # The same per-pixel work in either call: the same bits.
        assert torch.equal(g, ref)
    # Calls reading some of the maps give the same terms.
    low = deform_conv2d(maps, offs[:2], masks[:2], w, stride=2, sources=[0, 1])
    last = deform_conv2d(maps, offs[2:], masks[2:], w, stride=2, sources=[2])
    assert all(torch.equal(a, b) for a, b in zip(low + last, got))


@needs_mmcv
def test_several_maps_match_mmcv_on_both_backends():
    from mmcv.ops import modulated_deform_conv2d as mmcv_dcn

    maps, offs, masks, w = _several_maps()
    refs = [
        mmcv_dcn(m, o, k, w, None, 2, 1, 1, 1, 1)
        for m, o, k in zip(maps, offs, masks)
    ]
    for backend in ('torch', 'mmcv'):
        got = deform_conv2d(maps, offs, masks, w, stride=2, backend=backend)
        assert all(rel_err(g, r) < 1e-5 for g, r in zip(got, refs)), backend


def test_several_maps_need_one_offset_and_mask_each():
    maps, offs, masks, w = _several_maps()
    with pytest.raises(ValueError, match='one offset and one mask per term'):
        deform_conv2d(maps, offs[:2], masks, w, stride=2)
    assert deform_conv2d([], [], [], w) == []


def test_native_path_under_autocast_runs_in_bfloat16():
    x, off, m, w, b = _inputs()
    ref = modulated_deform_conv2d(x, off, m, w, b, backend='torch')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = modulated_deform_conv2d(x, off, m, w, b, backend='torch')
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref) < 3e-2


def _op_args(stride=1, dilation=1, h=6, w=7, zero=False, dtype=torch.float64):
    """Operator arguments (float64): a 3x3 kernel, padding = dilation."""
    torch.manual_seed(0)
    ho = (h - 1) // stride + 1
    wo = (w - 1) // stride + 1
    x = torch.randn(2, 3, h, w, dtype=dtype)
    offset = (torch.rand(2, 18, ho, wo, dtype=dtype) - 0.5) * 5 + 0.013
    if zero:
        offset.zero_()
    mask = torch.rand(2, 9, ho, wo, dtype=dtype)
    weight = torch.randn(4, 3, 3, 3, dtype=dtype)
    bias = torch.randn(4, dtype=dtype)
    geometry = (stride, stride, dilation, dilation, dilation, dilation)
    return (x, offset, mask, weight, bias, *geometry)


@pytest.mark.parametrize(
    'case',
    [dict(), dict(stride=2), dict(dilation=2), dict(zero=True)],
    ids=lambda c: '-'.join(f'{k}={v}' for k, v in c.items()) or 'plain',
)
def test_operator_passes_opcheck(case):
    """Schema, fake tensors, autograd registration and AOT dispatch."""
    args = _op_args(**case)
    torch.library.opcheck(modulated_deform_conv2d_op, args)
    no_bias = (*args[:4], None, *args[5:])
    torch.library.opcheck(modulated_deform_conv2d_op, no_bias)
    # Compiled graphs rely on the strides the fake implementation reports
    # (contiguous): the real gradients must have them too.
    out = modulated_deform_conv2d_op(*args)
    grads = torch.ops.mmdet_dyhead.modulated_deform_conv2d_backward(
        torch.randn_like(out), *args[:4], *args[5:]
    )
    for g, t in zip(grads, args[:4]):
        assert g.shape == t.shape and g.is_contiguous()


def test_operator_refuses_groups_it_does_not_implement():
    x, offset, mask, weight, bias, *geometry = _op_args()
    with pytest.raises(ValueError, match='one weight group'):
        modulated_deform_conv2d_op(
            x, offset, mask, weight[:, :1], bias, *geometry
        )
    with pytest.raises(ValueError, match='one offset group'):
        modulated_deform_conv2d_op(
            x, offset.repeat(1, 2, 1, 1), mask, weight, bias, *geometry
        )


def test_compile_and_export_see_one_operator_node():
    x, offset, mask, weight, bias, *_ = _op_args(dtype=torch.float32)
    layer = ModulatedDeformConv(3, 4, bias=True)
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward

    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    assert torch.equal(compiled(x, offset, mask), layer(x, offset, mask))
    dcn = [t for t in seen if 'deform' in t or 'grid_sampler' in t]
    assert dcn == ['mmdet_dyhead.modulated_deform_conv2d.default']
    program = torch.export.export(layer, (x, offset, mask))
    targets = [
        str(n.target)
        for n in program.graph.nodes
        if n.op == 'call_function'
        and ('deform' in str(n.target) or 'grid' in str(n.target))
    ]
    assert targets == ['mmdet_dyhead.modulated_deform_conv2d.default']


_HAS_EXT = importlib.util.find_spec('mmdet_dyhead._ext') is not None


def test_cpu_implementation_can_be_forced_to_pure_pytorch(monkeypatch):
    args = _op_args(dtype=torch.float32)
    leaves = [a.clone().requires_grad_() for a in args[:5]]
    out = modulated_deform_conv2d_op(*leaves, *args[5:])
    monkeypatch.setenv(CPU_IMPL_ENV, 'torch')
    assert dcn_cpu_implementation() == 'torch'
    ref_leaves = [a.clone().requires_grad_() for a in args[:5]]
    ref = modulated_deform_conv2d_op(*ref_leaves, *args[5:])
    assert rel_err(out, ref) < 1e-5
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    for name, a, b in zip(('input', 'offset', 'mask'), leaves, ref_leaves):
        assert rel_err(a.grad, b.grad) < 1e-5, name
    monkeypatch.setenv(CPU_IMPL_ENV, 'fortran')
    with pytest.raises(ValueError, match='not a DCN CPU implementation'):
        dcn_cpu_implementation()


@pytest.mark.skipif(_HAS_EXT, reason='the compiled extension is installed')
def test_without_the_extension_the_pure_pytorch_implementation_runs(
    monkeypatch,
):
    assert dcn_cpu_implementation() == 'torch'
    monkeypatch.setenv(CPU_IMPL_ENV, 'cpp')
    with pytest.raises(RuntimeError, match='mmdet_dyhead._ext'):
        dcn_cpu_implementation()


@needs_mmcv
@pytest.mark.parametrize('zero', [False, True])
@pytest.mark.parametrize('stride', [1, 2])
def test_mmcv_kernel_implementation_matches_mmcv_function(stride, zero):
    """The CUDA implementation's calls of mmcv's kernel, run on mmcv's CPU
    build: the same forward and gradients as mmcv's own function."""
    from mmcv.ops import modulated_deform_conv2d as mmcv_dcn

    from mmdet_dyhead.ops.dcn_op import (
        mmcv_kernel_backward,
        mmcv_kernel_forward,
    )

    x, offset, mask, weight, bias, *geometry = _op_args(
        stride=stride, zero=zero
    )
    out = mmcv_kernel_forward(x, offset, mask, weight, bias, *geometry)
    leaves = [t.clone().requires_grad_() for t in (x, offset, mask, weight)]
    ref = mmcv_dcn(*leaves, bias, stride, 1, 1, 1, 1)
    assert rel_err(out, ref) < 1e-12
    grad = torch.randn_like(ref)
    ref.backward(grad)
    got = mmcv_kernel_backward(grad, x, offset, mask, weight, *geometry)
    for name, g, leaf in zip(
        ('input', 'offset', 'mask', 'weight'), got, leaves
    ):
        assert rel_err(g, leaf.grad) < 1e-12, name


@needs_mmcv
@pytest.mark.parametrize('dilation', [1, 2])
def test_zero_offsets_gradients_match_mmcv(dilation):
    """mmdet's initialisation: every tap exactly on a pixel (and the border
    taps on -1), where only one-sided derivatives exist."""
    from mmcv.ops import modulated_deform_conv2d as mmcv_dcn

    args = _op_args(dilation=dilation, zero=True)
    ours = [a.clone().requires_grad_() for a in args[:5]]
    theirs = [a.clone().requires_grad_() for a in args[:5]]
    out = modulated_deform_conv2d(*ours, padding=dilation, dilation=dilation)
    ref = mmcv_dcn(*theirs, 1, dilation, dilation, 1, 1)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert rel_err(out, ref) < 1e-12
    for name, a, b in zip(
        ('input', 'offset', 'mask', 'weight', 'bias'), ours, theirs
    ):
        assert b.grad.abs().max() > 0, name
        assert rel_err(a.grad, b.grad) < 1e-12, name


@pytest.mark.skipif(not _HAS_EXT, reason='compiled extension not installed')
@pytest.mark.parametrize(
    'case',
    [
        dict(),
        dict(zero=True),
        dict(stride=2),
        dict(dilation=2),
        dict(h=1, w=1),
    ],
    ids=lambda c: '-'.join(f'{k}={v}' for k, v in c.items()) or 'plain',
)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_compiled_extension_matches_pure_pytorch(case, dtype, monkeypatch):
    args = _op_args(dtype=dtype, **case)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    results = []
    for impl in ('cpp', 'torch'):
        monkeypatch.setenv(CPU_IMPL_ENV, impl)
        assert dcn_cpu_implementation() == impl
        leaves = [a.clone().requires_grad_() for a in args[:5]]
        out = modulated_deform_conv2d_op(*leaves, *args[5:])
        out.backward(torch.ones_like(out))
        results.append([out] + [leaf.grad for leaf in leaves])
    for name, a, b in zip(
        ('out', 'input', 'offset', 'mask', 'weight', 'bias'), *results
    ):
        assert rel_err(a, b) < tol, name
