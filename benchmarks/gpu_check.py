"""The CUDA path as a user meets it, checked in one run (a few minutes).

1. ``DyHeadNeck`` with mmcv's CUDA kernel (``dcn_backend='mmcv'``, what
   ``'auto'`` picks on CUDA) against the native PyTorch path, same weights:
   outputs, the input gradient and every parameter gradient; and against
   mmdet's ``DyHead`` (outputs and input gradient). From random offsets
   and from mmdet's default initialisation (zero offsets).
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
import os
import os.path as osp
import sys
import time
from typing import Dict, List, Optional

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


def check_backends(device, size, batch, channels, blocks) -> List[str]:
    """Check 1; returns report lines, raises AssertionError on failure."""
    lines = [
        f'### 1. mmcv kernel vs native path in DyHeadNeck ({size[0]}x'
        f'{size[1]}, batch {batch}, {blocks} blocks, C={channels})',
        '',
        '| init | max rel. error | mmcv vs native | mmdet DyHead vs ours |',
        '|---|---|---|---|',
    ]
    failures = []
    # TF32 (cuDNN's default on Ampere and later) rounds convolution inputs
    # to 10 mantissa bits, which would swamp a 1e-4 comparison; the check
    # is of the kernels, so it runs in true float32.
    tf32 = (
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    )
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _compare_inits(device, size, batch, channels, blocks, lines, failures)
    finally:
        (
            torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32,
        ) = tf32
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
