"""The CUDA path as a user meets it, checked in one run (a few minutes).

1. ``DyHeadNeck`` with mmcv's autograd function (``dcn_backend='mmcv'``)
   against the package's operator (``'torch'``, what ``'auto'`` picks:
   mmcv's kernel called by ``mmdet_dyhead::modulated_deform_conv2d``),
   same weights: outputs, the input gradient and every parameter
   gradient; and against mmdet's ``DyHead`` (outputs and input gradient).
   From random offsets and from mmdet's default initialisation (zero
   offsets). One DCN layer: the operator against its pure-PyTorch
   implementation run on the same device (forward and the four
   gradients), an implementation independent of mmcv's.
1b. ``DyHeadNeck(compile=...)`` (inductor on CUDA, ``aot_eager`` in the
   CPU smoke run) keeps the operator: its graph has one operator node per
   DCN and no ``grid_sampler``, the profiler sees mmcv's CUDA kernels run,
   and outputs and gradients equal eager from zero offsets to float32
   rounding (from random offsets within the spread an input perturbation
   of 1e-7 already causes: a tap crossing a pixel switches its one-sided
   derivative).
2. An fp16 AMP training step (mmengine's ``AmpOptimWrapper``, dynamic loss
   scaling) of ATSS-R50 + DyHeadNeck-6 runs and stays finite; its first
   loss is compared with the float32 loss of the same weights.
3. Speed and peak memory against mmdet's ``DyHead``: one training
   iteration of the two ATSS-R50 detectors
   (``benchmarks/benchmark_training.py``) and the neck alone
   (``benchmarks/benchmark_dyhead.py``), at 800x1344 batch 2; on CUDA also
   the neck compiled with ``torch.compile`` against eager and the compiled
   dense floor (``benchmarks/benchmark_compile.py``).

Prints a report and writes it to ``--out``. Exits 1 when a check fails.
``--device cpu --quick`` runs the same code on CPU at a tiny size (mmcv's
CPU kernel, bf16 instead of fp16), which is how the test suite keeps this
script working on machines without a GPU::

    python benchmarks/gpu_check.py            # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/g.md
"""

import argparse
import contextlib
import os
import os.path as osp
import re
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import (  # noqa: E402
    benchmark_compile,
    benchmark_dyhead,
    benchmark_training,
)
from benchmarks.benchmark_dyhead import (  # noqa: E402
    load_average,
    machine_info,
    pyramid,
)

# mmcv's CUDA DCNv2 kernels: forward (im2col) and backward (col2im,
# col2im_coord).
MMCV_KERNEL = re.compile(r'modulated_deformable_\w+_gpu_kernel')
# Float32 sums of different orders: what two exact implementations of the
# same function may differ by, relative to the largest value.
TOL = {'cuda': 1e-4, 'cpu': 1e-4}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def run_neck(model, feats, weights):
    """Outputs, input grads and named param grads of one fwd+bwd."""
    inputs = [f.detach().clone().requires_grad_() for f in feats]
    model.zero_grad()
    outs = model(inputs)
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    loss.backward()
    grads = {
        n: p.grad.detach().clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    return [o.detach() for o in outs], [i.grad for i in inputs], grads


@contextlib.contextmanager
def true_float32():
    """TF32 off while comparing kernels.

    TF32 (cuDNN's default on Ampere and later) rounds convolution inputs
    to 10 mantissa bits, which would swamp a 1e-4 comparison; the checks
    are of the kernels, so they run in true float32.
    """
    saved = (
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    )
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        (
            torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32,
        ) = saved


def check_backends(device, size, batch, channels, blocks) -> List[str]:
    """Check 1; returns report lines, raises AssertionError on failure."""
    lines = [
        f'### 1. mmcv function vs the DCN operator in DyHeadNeck ({size[0]}x'
        f'{size[1]}, batch {batch}, {blocks} blocks, C={channels})',
        '',
        '| init | max rel. error | mmcv function vs operator '
        '| mmdet DyHead vs ours |',
        '|---|---|---|---|',
    ]
    failures = []
    with true_float32():
        _compare_inits(device, size, batch, channels, blocks, lines, failures)
        layer_lines, layer_failures = check_layer(device)
    lines += [''] + layer_lines
    failures += layer_failures
    lines.append('')
    lines.append(
        'FAIL: ' + '; '.join(failures)
        if failures
        else f'PASS (every error <= {TOL[device.type]:.0e})'
    )
    lines.append('')
    if failures:
        raise AssertionError('\n'.join(lines))
    return lines


def _compare_inits(device, size, batch, channels, blocks, lines, failures):
    """Check 1's table rows, from random and from zero offsets."""
    from mmdet.models.necks import DyHead

    from mmdet_dyhead.models import DyHeadNeck

    for init in ('random offsets', 'mmdet default (zero offsets)'):
        torch.manual_seed(0)
        ref = DyHead(
            channels,
            channels,
            num_blocks=blocks,
            zero_init_offset=init.startswith('mmdet'),
        )
        if init.startswith('random'):
            with torch.no_grad():
                for name, p in ref.named_parameters():
                    if 'spatial_conv_offset' in name:
                        p.normal_(0, 0.05)
        state = ref.state_dict()
        necks = {}
        for backend in ('mmcv', 'torch'):
            neck = DyHeadNeck(
                channels, channels, num_blocks=blocks, dcn_backend=backend
            )
            neck.load_state_dict(state)
            necks[backend] = neck.to(device)
        ref.to(device)
        feats = pyramid(batch, channels, size, device)
        weights = [torch.randn_like(f) for f in feats]
        res = {k: run_neck(m, feats, weights) for k, m in necks.items()}
        res_ref = run_neck(ref, feats, weights)
        errs = {
            'outputs': (
                max(
                    rel(a, b) for a, b in zip(res['mmcv'][0], res['torch'][0])
                ),
                max(rel(a, b) for a, b in zip(res_ref[0], res['torch'][0])),
            ),
            'input grads': (
                max(
                    rel(a, b) for a, b in zip(res['mmcv'][1], res['torch'][1])
                ),
                max(rel(a, b) for a, b in zip(res_ref[1], res['torch'][1])),
            ),
            'param grads': (
                max(
                    rel(res['mmcv'][2][n], g)
                    for n, g in res['torch'][2].items()
                ),
                float('nan'),  # parameter names differ; inputs cover it
            ),
        }
        for what, (ours, theirs) in errs.items():
            lines.append(
                f'| {init} | {what} | {ours:.1e} | '
                + ('-' if theirs != theirs else f'{theirs:.1e}')
                + ' |'
            )
            for value in (ours, theirs):
                if value == value and value > TOL[device.type]:
                    failures.append(f'{init}, {what}: {value:.1e}')


def check_layer(device) -> Tuple[List[str], List[str]]:
    """Check 1, one layer: the operator against its pure-PyTorch
    implementation on ``device`` (mmcv's kernel vs the gather code)."""
    from mmdet_dyhead.ops import modulated_deform_conv2d_op
    from mmdet_dyhead.ops.gather_conv import (
        gather_conv_backward,
        gather_conv_forward,
    )

    torch.manual_seed(0)
    lines, failures = ['| one layer, offsets | forward | gradients |'], []
    lines.append('|---|---|---|')
    for init in ('random', 'zero'):
        x = torch.randn(2, 64, 40, 56, device=device)
        offset = torch.randn(2, 18, 20, 28, device=device) * 2
        if init == 'zero':
            offset.zero_()
        mask = torch.rand(2, 9, 20, 28, device=device)
        weight = torch.randn(32, 64, 3, 3, device=device) * 0.05
        geometry = ((2, 2), (1, 1), (1, 1))
        leaves = [t.clone().requires_grad_() for t in (x, offset, mask)]
        out = modulated_deform_conv2d_op(
            *leaves, weight, None, 2, 2, 1, 1, 1, 1
        )
        grad = torch.randn_like(out)
        out.backward(grad)
        ref = gather_conv_forward(x, offset, mask, weight, *geometry)
        ref_grads = gather_conv_backward(
            grad, x, offset, mask, weight, *geometry
        )
        err_out = rel(out, ref)
        err_grad = max(
            rel(leaf.grad, g) for leaf, g in zip(leaves, ref_grads[:3])
        )
        lines.append(f'| {init} | {err_out:.1e} | {err_grad:.1e} |')
        for value in (err_out, err_grad):
            if value > TOL[device.type]:
                failures.append(f'one layer, {init} offsets: {value:.1e}')
    return lines, failures


def check_compiled(device, size, batch, channels, blocks) -> List[str]:
    """Check 1b; returns report lines, raises AssertionError on failure."""
    with true_float32():
        return _check_compiled(device, size, batch, channels, blocks)


def _check_compiled(device, size, batch, channels, blocks) -> List[str]:
    from mmdet.models.necks import DyHead

    from mmdet_dyhead.models import DyHeadNeck
    from mmdet_dyhead.ops import OP_NAME

    backend = 'inductor' if device.type == 'cuda' else 'aot_eager'
    lines = [
        f'### 1b. DyHeadNeck(compile=dict(backend={backend!r})) keeps the '
        f'DCN operator ({size[0]}x{size[1]}, batch {batch}, {blocks} '
        f'blocks, C={channels})',
        '',
        '| init | what | compiled vs eager | allowed |',
        '|---|---|---|---|',
    ]
    failures = []
    seen = set()

    def record(gm, inputs):
        seen.update(str(n.target) for n in gm.graph.nodes)
        return gm.forward

    # The graph check captures with a recording backend (the same graph
    # Dynamo hands inductor); the numbers come from the real backend.
    torch._dynamo.reset()
    probe = DyHeadNeck(channels, channels, num_blocks=blocks).to(device)
    torch.compile(probe, backend=record, fullgraph=True)(
        pyramid(batch, channels, size, device)
    )
    op_nodes = sum('mmdet_dyhead.modulated_deform_conv2d' in t for t in seen)
    if not op_nodes or any('grid_sampler' in t for t in seen):
        failures.append(f'compiled graph has no {OP_NAME} node or a grid')
    lines_kernel = []
    for init in ('mmdet default (zero offsets)', 'random offsets'):
        torch.manual_seed(0)
        ref = DyHead(channels, channels, num_blocks=blocks)
        if init.startswith('random'):
            with torch.no_grad():
                for name, p in ref.named_parameters():
                    if 'spatial_conv_offset' in name:
                        p.normal_(0, 0.05)
        eager = DyHeadNeck(channels, channels, num_blocks=blocks)
        compiled = DyHeadNeck(
            channels,
            channels,
            num_blocks=blocks,
            compile=dict(backend=backend),
        )
        for neck in (eager, compiled):
            neck.load_state_dict(ref.state_dict())
            neck.to(device)
        feats = pyramid(batch, channels, size, device)
        weights = [torch.randn_like(f) for f in feats]
        want = run_neck(eager, feats, weights)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == 'cuda':
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        run_neck(compiled, feats, weights)  # compiles
        with torch.profiler.profile(activities=activities) as prof:
            got = run_neck(compiled, feats, weights)
        names = {e.name for e in prof.events()}
        # Allowed spread: float32 rounding from zero offsets; from random
        # offsets what perturbing the input by 1e-7 does to eager itself.
        allowed = TOL[device.type]
        if init.startswith('random'):
            nudged = [f * (1 + 1e-7) for f in feats]
            spread = run_neck(eager, nudged, weights)
            allowed = max(allowed, 2 * _max_err(spread, want))
        errs = {
            'outputs': max(rel(a, b) for a, b in zip(got[0], want[0])),
            'input grads': max(rel(a, b) for a, b in zip(got[1], want[1])),
            'param grads': max(rel(got[2][n], g) for n, g in want[2].items()),
        }
        for what, value in errs.items():
            lines.append(f'| {init} | {what} | {value:.1e} | {allowed:.1e} |')
            if value > allowed:
                failures.append(f'compiled, {init}, {what}: {value:.1e}')
        if not any(OP_NAME in n for n in names):
            failures.append(f'{init}: the profiler saw no {OP_NAME} call')
        if any('grid_sampler' in n for n in names):
            failures.append(f'{init}: the compiled neck ran grid_sampler')
        if device.type == 'cuda':
            # Kernel events carry demangled names ("void modulated_...").
            mmcv_kernels = sorted(
                {
                    m.group(0)
                    for m in map(MMCV_KERNEL.search, names)
                    if m is not None
                }
            )
            lines_kernel.append(
                f'{init}: mmcv CUDA kernels run: '
                + (', '.join(mmcv_kernels) or 'NONE')
            )
            if not any('im2col' in n for n in mmcv_kernels):
                failures.append(f'{init}: mmcv im2col kernel did not run')
            if not any('col2im_coord' in n for n in mmcv_kernels):
                failures.append(f'{init}: mmcv backward kernel did not run')
    lines += ['', f'{op_nodes} operator nodes in the compiled block graph.']
    lines += lines_kernel + ['']
    lines.append('FAIL: ' + '; '.join(failures) if failures else 'PASS')
    lines.append('')
    torch._dynamo.reset()
    if failures:
        raise AssertionError('\n'.join(lines))
    return lines


def _max_err(a, b) -> float:
    """Largest relative error over outputs, input and parameter grads."""
    errs = [rel(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1])]
    errs += [rel(a[2][n], g) for n, g in b[2].items()]
    return max(errs)


def check_amp(device, size, steps) -> List[str]:
    """Check 2: AMP training steps of ATSS-R50 + DyHeadNeck-6."""
    from mmengine.optim import AmpOptimWrapper

    dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
    torch.manual_seed(0)
    model, fp32_wrapper = benchmark_training.build(
        'ATSS + DyHeadNeck-6', device
    )
    data = benchmark_training.batch(size, 2)
    packed = model.data_preprocessor(data, True)
    with torch.no_grad():
        fp32_loss, _ = model.parse_losses(model(**packed, mode='loss'))
    if device.type == 'cuda':
        wrapper = AmpOptimWrapper(
            optimizer=fp32_wrapper.optimizer, loss_scale='dynamic', dtype=dtype
        )
    else:  # mmengine's wrapper refuses the CPU; bf16 needs no scaling
        from mmdet_dyhead.engine import CPUAmpOptimWrapper

        wrapper = CPUAmpOptimWrapper(
            optimizer=fp32_wrapper.optimizer, dtype=dtype
        )
    lines = [
        f'### 2. {dtype} AMP training of ATSS-R50 + DyHeadNeck-6 '
        f'({size[0]}x{size[1]}, batch 2)',
        '',
        '| step | loss | grad norm (unscaled) | loss scale |',
        '|---|---|---|---|',
    ]
    failures = []
    first = None
    for step in range(steps):
        with wrapper.optim_context(model):
            loss, _ = model.parse_losses(model(**packed, mode='loss'))
        first = loss.item() if first is None else first
        wrapper.backward(loss)
        scaler = getattr(wrapper, 'loss_scaler', None)
        if scaler is not None and device.type == 'cuda':
            scaler.unscale_(wrapper.optimizer)
            scale = scaler.get_scale()
        else:
            scale = 1.0
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.norm(torch.stack([g.float().norm() for g in grads]))
        wrapper.step()
        wrapper.zero_grad()
        lines.append(
            f'| {step} | {loss.item():.4f} | {norm.item():.3g} | {scale:g} |'
        )
        if not torch.isfinite(loss):
            failures.append(f'step {step}: loss {loss.item()}')
    params_ok = all(torch.isfinite(p).all() for p in model.parameters())
    if not params_ok:
        failures.append('non-finite parameters after training')
    drift = abs(first - fp32_loss.item()) / abs(fp32_loss.item())
    lines += [
        '',
        f'First loss: {first:.4f} in {dtype}, {fp32_loss.item():.4f} in '
        f'float32 (relative difference {drift:.1e}).',
        '',
    ]
    if drift > 0.05:
        failures.append(f'first AMP loss differs from float32 by {drift:.1e}')
    lines.append('FAIL: ' + '; '.join(failures) if failures else 'PASS')
    lines.append('')
    if failures:
        raise AssertionError('\n'.join(lines))
    return lines


def speed(args, device, work_dir) -> List[str]:
    """Check 3: the two benchmark scripts, their tables appended."""
    lines = ["### 3. Speed and peak memory against mmdet's DyHead", '']
    size = f'{args.size[0]}x{args.size[1]}'
    train_out = osp.join(work_dir, 'training.md')
    argv = [
        '--device', str(device), '--sizes', size, '--batches', '2',
        '--repeats', str(args.repeats), '--memory', '--breakdown',
        '--models', benchmark_training.OURS, benchmark_training.MMDET,
        '--out', train_out,
    ]  # fmt: skip
    if device.type == 'cpu':
        argv += ['--threads', str(torch.get_num_threads())]
    benchmark_training.main(argv)
    neck_out = osp.join(work_dir, 'neck.md')
    neck_argv = [
        '--device', str(device), '--sizes', size, '--batches', '2',
        '--no-scaling', '--out', neck_out,
    ]  # fmt: skip
    if args.quick:
        neck_argv += ['--quick', '--no-scaling']
    benchmark_dyhead.main(neck_argv)
    outs = [train_out, neck_out]
    if device.type == 'cuda':
        # The neck compiled with inductor (Triton on CUDA) vs eager and the
        # compiled dense floor; skipped in the CPU smoke run, where
        # compiling C++ kernels alone takes minutes.
        compile_out = osp.join(work_dir, 'compile.md')
        benchmark_compile.main(
            ['--device', str(device), '--sizes', size, '--sections', 'neck',
             '--repeats', str(args.repeats), '--out', compile_out]
        )  # fmt: skip
        outs.append(compile_out)
    for path in outs:
        with open(path) as f:
            lines += ['#' + line if line.startswith('#') else line
                      for line in f.read().splitlines()]  # fmt: skip
        lines.append('')
    return lines


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cuda')
    p.add_argument(
        '--size',
        type=benchmark_dyhead.parse_size,
        default=(800, 1344),
        help='HxW of every check (default: 800x1344)',
    )
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--amp-steps', type=int, default=5)
    p.add_argument(
        '--quick',
        action='store_true',
        help='tiny sizes, 2 blocks, 32 channels in check 1; one AMP step; '
        'one repeat (a smoke run, e.g. on CPU)',
    )
    p.add_argument(
        '--skip-speed', action='store_true', help='checks 1 and 2 only'
    )
    p.add_argument('--out', default='work_dirs/gpu_check/report.md')
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        sys.exit(
            'gpu_check: no CUDA device visible to torch. Run it on a GPU '
            'machine, or pass --device cpu --quick for a CPU smoke run.'
        )
    import mmdet_dyhead  # noqa: F401

    work_dir = osp.dirname(osp.abspath(args.out))
    os.makedirs(work_dir, exist_ok=True)
    if args.quick:
        neck = dict(size=(64, 96), batch=2, channels=32, blocks=2)
        amp_size, args.amp_steps, args.repeats = (64, 96), 1, 1
        args.size = (128, 128)
    else:
        neck = dict(size=args.size, batch=2, channels=256, blocks=6)
        amp_size = args.size
    start = time.time()
    report = [
        '## CUDA checks (benchmarks/gpu_check.py)',
        '',
        f'Machine: {machine_info(device)}; load average {load_average()}',
        '',
    ]
    status = 0
    checks: Dict[str, callable] = {
        'backends': lambda: check_backends(device, **neck),
        'compiled': lambda: check_compiled(device, **neck),
        'amp': lambda: check_amp(device, amp_size, args.amp_steps),
    }
    if not args.skip_speed:
        checks['speed'] = lambda: speed(args, device, work_dir)
    print('\n'.join(report), flush=True)
    for name, check in checks.items():
        try:
            lines = check()
        except AssertionError as err:
            lines = str(err).splitlines()
            status = 1
        report += lines
        print('\n'.join(lines), flush=True)
    report.append(f'Total time: {time.time() - start:.0f} s.')
    with open(args.out, 'w') as f:
        f.write('\n'.join(report) + '\n')
    print(f'Report written to {args.out}')
    return status


if __name__ == '__main__':
    sys.exit(main())
