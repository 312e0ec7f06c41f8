"""The compiled CPU kernel (mmdet_dyhead._ext) against the native path and
mmcv's CPU kernel: forward and every gradient, and float64 gradcheck."""

import pytest
import torch

from mmdet_dyhead.ops import (
    CPU_IMPL_ENV,
    dcn_cpu_implementation,
    mmcv_ops_available,
    modulated_deform_conv2d,
)
from tests.helpers import rel_err

try:
    from mmdet_dyhead import _ext
except ImportError:  # not built: pure-PyTorch install
    _ext = None

pytestmark = pytest.mark.skipif(
    _ext is None,
    reason='mmdet_dyhead._ext is not built (python setup.py build_ext '
    '--inplace)',
)
needs_mmcv = pytest.mark.skipif(
    not mmcv_ops_available(), reason='mmcv built without ops'
)

NAMES = ('input', 'offset', 'mask', 'weight')


def _out_size(size, k, stride, padding, dilation):
    return tuple(
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, st, p, d in zip(size, stride, padding, dilation)
    )


def _case(
    n=2,
    c=8,
    co=6,
    size=(11, 13),
    k=3,
    stride=(1, 1),
    padding=(1, 1),
    dilation=(1, 1),
    offsets='random',
    dtype=torch.float32,
):
    """Inputs of one layer. ``offsets``: 'random' (a few pixels, some taps
    outside the map, never integer), 'zero' (every tap on a pixel, mmdet's
    initialisation) or 'far' (most taps pushed outside the map)."""
    ho, wo = _out_size(size, k, stride, padding, dilation)
    x = torch.randn(n, c, *size, dtype=dtype)
    shape = (n, 2 * k * k, ho, wo)
    if offsets == 'zero':
        offset = torch.zeros(shape, dtype=dtype)
    else:
        scale = 6 if offsets == 'random' else 3 * max(size)
        offset = (torch.rand(shape, dtype=dtype) - 0.5) * scale + 0.013
    mask = torch.rand(n, k * k, ho, wo, dtype=dtype)
    weight = torch.randn(co, c, k, k, dtype=dtype) * 0.1
    bias = torch.randn(co, dtype=dtype)
    geometry = (*stride, *padding, *dilation)
    return (x, offset, mask, weight, bias), geometry


def _kernel(args, geometry, grad_out):
    x, offset, mask, weight, bias = args
    out = _ext.dcn_forward(x, offset, mask, weight, bias, *geometry)
    grads = _ext.dcn_backward(grad_out, x, offset, mask, weight, *geometry)
    return out, grads


def _autograd(fn, args, grad_out):
    leaves = [a.clone().requires_grad_() for a in args[:4]]
    out = fn(*leaves, args[4])
    # allow_unused: on a 1x1 map the native path may drop every tap.
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    grads = [
        torch.zeros_like(a) if g is None else g for a, g in zip(leaves, grads)
    ]
    return out.detach(), grads


def _native(args, geometry):
    """The pure-PyTorch implementation of the package's operator (the test
    forces it with the ``pure_torch`` fixture, else the operator would run
    the kernel under test)."""
    s, p, d = geometry[0:2], geometry[2:4], geometry[4:6]
    return lambda *a: modulated_deform_conv2d(
        *a, stride=s, padding=p, dilation=d, backend='torch'
    )


@pytest.fixture
def pure_torch(monkeypatch):
    monkeypatch.setenv(CPU_IMPL_ENV, 'torch')
    assert dcn_cpu_implementation() == 'torch'


def _mmcv(args, geometry):
    from mmcv.ops import modulated_deform_conv2d as mmcv_dcn

    s, p, d = geometry[0:2], geometry[2:4], geometry[4:6]
    return lambda x, o, m, w, b: mmcv_dcn(x, o, m, w, b, s, p, d, 1, 1)


def _assert_equal(ours, ref, tol=1e-5):
    (out, grads), (ref_out, ref_grads) = ours, ref
    assert out.shape == ref_out.shape
    assert rel_err(out, ref_out) < tol, 'output'
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert g.shape == r.shape, name
        assert rel_err(g, r) < tol, name


CASES = {
    'random offsets': dict(),
    'zero offsets': dict(offsets='zero'),
    'taps pushed outside': dict(offsets='far'),
    'stride 2': dict(stride=(2, 2), size=(12, 9)),
    'dilation 2': dict(dilation=(2, 2), padding=(2, 2)),
    'padding 0': dict(padding=(0, 0), size=(9, 17)),
    'non-square geometry': dict(
        stride=(2, 1), padding=(1, 0), dilation=(1, 2), size=(10, 15)
    ),
    '1x1 map': dict(size=(1, 1)),
    '1x1 map, zero offsets': dict(size=(1, 1), offsets='zero'),
    'DyHead channels, zero offsets': dict(
        c=32, co=16, size=(20, 28), offsets='zero'
    ),
    'DyHead channels, stride 2': dict(
        c=32, co=16, size=(20, 28), stride=(2, 2)
    ),
    '1x1 kernel': dict(k=1, padding=(0, 0)),
}


@pytest.fixture(params=[1, 2], ids=['1 thread', '2 threads'])
def threads(request):
    """Both a single chunk and per-thread accumulators that are reduced."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize('case', CASES)
def test_kernel_equals_the_native_path(case, threads, pure_torch):
    args, geometry = _case(**CASES[case])
    out_ref = _native(args, geometry)(*args)
    grad_out = torch.randn_like(out_ref)
    ref = _autograd(_native(args, geometry), args, grad_out)
    _assert_equal(_kernel(args, geometry, grad_out), ref)


@needs_mmcv
@pytest.mark.parametrize('case', CASES)
def test_kernel_equals_mmcv(case):
    args, geometry = _case(**CASES[case])
    out_ref = _mmcv(args, geometry)(*args)
    grad_out = torch.randn_like(out_ref)
    ref = _autograd(_mmcv(args, geometry), args, grad_out)
    _assert_equal(_kernel(args, geometry, grad_out), ref)


def test_zero_offset_gradients_are_the_one_sided_ones():
    """From mmdet's initialisation every tap sits on a pixel, where the
    bilinear read has only one-sided slopes: the offset gradient is the
    forward difference along y (x) of the map, zero outside it, and taps on
    the border lines y = -1 or x = -1 get none (mmcv's rules). Checked
    against that definition, written with slices of the padded map."""
    h, w = 6, 7
    args, geometry = _case(n=1, c=4, co=3, size=(h, w), offsets='zero')
    x, _, mask, weight, _ = args
    grad_out = torch.randn(1, 3, h, w)
    _, (_, grad_offset, _, _) = _kernel(args, geometry, grad_out)
    # padded[:, 1 + y, 1 + x] = x[:, y, x]; zeros up to y = H + 1.
    padded = torch.nn.functional.pad(x[0], (1, 2, 1, 2))
    rows = torch.arange(h).view(h, 1)
    cols = torch.arange(w).view(1, w)
    for i in range(3):
        for j in range(3):
            k = i * 3 + j
            # Tap (i, j) of pixel (r, c) reads (r - 1 + i, c - 1 + j).
            y, xx = rows - 1 + i, cols - 1 + j
            inside = (y > -1) & (y < h) & (xx > -1) & (xx < w)
            here = padded[:, i : i + h, j : j + w]
            below = padded[:, i + 1 : i + 1 + h, j : j + w]
            right = padded[:, i : i + h, j + 1 : j + 1 + w]
            grad_col = torch.einsum(
                'ohw,oc->chw', grad_out[0], weight[:, :, i, j]
            )
            for axis, step in ((0, below), (1, right)):
                want = (grad_col * (step - here)).sum(0)
                want = want * mask[0, k] * inside
                got = grad_offset[0, 2 * k + axis]
                assert rel_err(got, want) < 1e-5, (i, j, axis)


class _KernelFunction(torch.autograd.Function):
    """The kernel as an autograd function, for gradcheck only."""

    @staticmethod
    def forward(ctx, x, offset, mask, weight, geometry):
        ctx.save_for_backward(x, offset, mask, weight)
        ctx.geometry = geometry
        return _ext.dcn_forward(x, offset, mask, weight, None, *geometry)

    @staticmethod
    def backward(ctx, grad_out):
        grads = _ext.dcn_backward(
            grad_out.contiguous(), *ctx.saved_tensors, *ctx.geometry
        )
        return (*grads, None)


def test_float64_gradcheck():
    geometry = (1, 2, 1, 0, 1, 1)  # stride (1, 2), padding (1, 0)
    x = torch.randn(1, 2, 4, 6, dtype=torch.float64)
    ho, wo = _out_size((4, 6), 3, (1, 2), (1, 0), (1, 1))
    # Fractional parts in [0.2, 0.8] keep every tap away from the pixel
    # lines where the bilinear read has a kink, and inside the map's
    # support, so finite differences see one smooth piece.
    whole = torch.randint(-1, 1, (1, 18, ho, wo)).double()
    offset = whole + 0.2 + 0.6 * torch.rand(1, 18, ho, wo).double()
    mask = torch.rand(1, 9, ho, wo, dtype=torch.float64)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (x, offset, mask, weight)]
    assert torch.autograd.gradcheck(
        lambda *a: _KernelFunction.apply(*a, geometry), leaves
    )


def test_float64_matches_the_native_path_to_float64_rounding(pure_torch):
    args, geometry = _case(dtype=torch.float64, stride=(2, 2))
    out_ref = _native(args, geometry)(*args)
    grad_out = torch.randn_like(out_ref)
    ref = _autograd(_native(args, geometry), args, grad_out)
    _assert_equal(_kernel(args, geometry, grad_out), ref, tol=1e-12)


def test_non_contiguous_inputs_are_read_correctly():
    args, geometry = _case()
    x, offset, mask, weight, bias = args
    strided = (
        x.transpose(2, 3).contiguous().transpose(2, 3),
        offset.contiguous(memory_format=torch.channels_last),
        mask[:, list(range(9))],
        weight.transpose(0, 1).contiguous().transpose(0, 1),
    )
    grad_out = torch.randn(2, 6, 11, 13).transpose(2, 3).contiguous()
    grad_out = grad_out.transpose(2, 3)
    out, grads = _kernel((*strided, bias), geometry, grad_out)
    ref_out, ref_grads = _kernel(args, geometry, grad_out.contiguous())
    assert torch.equal(out, ref_out)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)


@pytest.mark.parametrize(
    'change, message',
    [
        (dict(offset=torch.zeros(2, 16, 11, 13)), 'offset must be'),
        (dict(mask=torch.zeros(2, 9, 11, 12)), 'mask must be'),
        (dict(weight=torch.zeros(6, 5, 3, 3)), 'input channels'),
        (dict(mask=torch.zeros(2, 9, 11, 13).double()), 'dtype'),
        (dict(input=torch.zeros(2, 8, 11, 13).half()), 'float32 or float64'),
        (dict(input=torch.zeros(8, 11, 13)), 'input must be'),
    ],
)
def test_bad_input_is_refused_with_the_problem_named(change, message):
    args, geometry = _case()
    named = dict(zip(('input', 'offset', 'mask', 'weight'), args))
    named.update(change)
    with pytest.raises(RuntimeError, match=message):
        _ext.dcn_forward(*named.values(), None, *geometry)
    with pytest.raises(RuntimeError, match=message):
        _ext.dcn_backward(
            torch.zeros(2, 6, 11, 13), *named.values(), *geometry
        )


def test_bias_is_added_and_optional():
    args, geometry = _case()
    x, offset, mask, weight, bias = args
    with_bias = _ext.dcn_forward(x, offset, mask, weight, bias, *geometry)
    without = _ext.dcn_forward(x, offset, mask, weight, None, *geometry)
    assert torch.allclose(
        with_bias, without + bias.view(1, -1, 1, 1), atol=1e-6
    )


def test_repeated_calls_give_identical_results(threads):
    """Threads share the tiles at run time; the numbers must not depend on
    which thread ran which tile (training runs are repeatable)."""
    args, geometry = _case(c=32, co=16, size=(30, 41))
    grad_out = torch.randn(2, 16, 30, 41)
    first_out, first_grads = _kernel(args, geometry, grad_out)
    for _ in range(3):
        out, grads = _kernel(args, geometry, grad_out)
        assert torch.equal(out, first_out)
        for g, f in zip(grads, first_grads):
            assert torch.equal(g, f)
