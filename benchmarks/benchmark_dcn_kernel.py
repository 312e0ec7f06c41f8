"""One DCN layer on CPU: the compiled kernel against the native path and the
dense conv of the same FLOPs.

For each map size and thread count, forward (no autograd) and
forward+backward (every gradient the layer has) of:

- **C++ kernel**: ``mmdet_dyhead._ext`` (``dcn_forward`` then
  ``dcn_backward``: input, offset, mask and weight gradients);
- **native PyTorch**: ``modulated_deform_conv2d(..., backend='torch')``
  with autograd (the same four gradients), with the operator's
  pure-PyTorch CPU implementation forced (``MMDET_DYHEAD_DCN_CPU=torch``;
  otherwise the operator itself runs the kernel);
- **dense conv**: ``F.conv2d`` with the same weight shape (input and weight
  gradients), the floor a deformable conv of these FLOPs can reach.

Times are medians over repeats in which the three alternate
(``benchmark_dyhead.round_robin``), so load changes hit them alike; the
ratios are against the dense conv of the same run. ``--contention`` also
times the 2-thread case while a second process keeps one core busy with a
one-thread conv loop, and reports how much each implementation slows down
(a kernel whose threads wait for each other at many points suffers most).

The kernel must be built first (``python setup.py build_ext --inplace`` in
a checkout, or ``scripts/install.sh``).

Examples::

    python benchmarks/benchmark_dcn_kernel.py
    python benchmarks/benchmark_dcn_kernel.py --maps 100x168 --threads 2 \\
        --contention --out work_dirs/benchmark_dcn_kernel/contention.md
"""

import argparse
import os
import os.path as osp
import shlex
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.benchmark_dyhead import (  # noqa: E402
    load_average,
    machine_info,
    parse_size,
    round_robin,
)

KINDS = ('C++ kernel', 'native PyTorch', 'dense conv')

# The second process of --contention: a one-thread conv loop (one core busy
# with the same kind of work), stopped by this script.
BUSY_LOOP = (
    'import torch\n'
    'torch.set_num_threads(1)\n'
    'x = torch.randn(1, 64, 64, 64)\n'
    'w = torch.randn(64, 64, 3, 3)\n'
    'while True:\n'
    '    torch.nn.functional.conv2d(x, w, padding=1)\n'
)


def load_kernel():
    try:
        from mmdet_dyhead import _ext
    except ImportError as exc:
        raise SystemExit(
            f'mmdet_dyhead._ext is not built ({exc}). Build it with '
            '`python setup.py build_ext --inplace` in the checkout.'
        )
    return _ext


def layer_fns(
    size: Tuple[int, int], channels: int
) -> Tuple[Dict[str, Callable], Dict[str, Callable]]:
    """(forward, forward+backward) callables of the three implementations
    on one (1, channels, H, W) map, stride 1, padding 1, 3x3."""
    from mmdet_dyhead.ops import CPU_IMPL_ENV, modulated_deform_conv2d

    ext = load_kernel()
    torch.manual_seed(0)
    h, w = size
    x = torch.randn(1, channels, h, w)
    offset = torch.randn(1, 18, h, w) * 2
    mask = torch.rand(1, 9, h, w)
    weight = torch.randn(channels, channels, 3, 3) * 0.01
    geometry = (1, 1, 1, 1, 1, 1)
    grad = torch.randn(1, channels, h, w)
    leaves = [t.clone().requires_grad_() for t in (x, offset, mask, weight)]
    dense_leaves = [leaves[0], leaves[3]]

    def pure_torch(fn):
        def run():
            before = os.environ.get(CPU_IMPL_ENV)
            os.environ[CPU_IMPL_ENV] = 'torch'
            try:
                fn()
            finally:
                if before is None:
                    del os.environ[CPU_IMPL_ENV]
                else:
                    os.environ[CPU_IMPL_ENV] = before

        return run

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()

        return run

    def kernel_fb():
        ext.dcn_forward(x, offset, mask, weight, None, *geometry)
        ext.dcn_backward(grad, x, offset, mask, weight, *geometry)

    def native_fb():
        out = modulated_deform_conv2d(*leaves, backend='torch')
        torch.autograd.grad(out, leaves, grad)

    def dense_fb():
        out = F.conv2d(dense_leaves[0], dense_leaves[1], padding=1)
        torch.autograd.grad(out, dense_leaves, grad)

    forward = {
        'C++ kernel': no_grad(
            lambda: ext.dcn_forward(x, offset, mask, weight, None, *geometry)
        ),
        'native PyTorch': pure_torch(
            no_grad(
                lambda: modulated_deform_conv2d(
                    x, offset, mask, weight, backend='torch'
                )
            )
        ),
        'dense conv': no_grad(lambda: F.conv2d(x, weight, padding=1)),
    }
    backward = {
        'C++ kernel': kernel_fb,
        'native PyTorch': pure_torch(native_fb),
        'dense conv': dense_fb,
    }
    return forward, backward


def time_layer(size, args) -> Dict[str, Dict[str, float]]:
    """{kind: {'fwd': s, 'fwd+bwd': s}}, medians of ``args.repeats``."""
    forward, backward = layer_fns(size, args.channels)
    fwd = round_robin(forward, 1, args.repeats, torch.device('cpu'))
    both = round_robin(backward, 1, args.repeats, torch.device('cpu'))
    return {k: {'fwd': fwd[k], 'fwd+bwd': both[k]} for k in KINDS}


def table(title: str, rows: Dict[str, Dict[str, float]]) -> str:
    ref = rows['dense conv']
    lines = [
        f'\n#### {title}\n',
        '| implementation | forward (ms) | vs dense | forward+backward (ms) '
        '| vs dense |',
        '|---|---|---|---|---|',
    ]
    for k, r in rows.items():
        lines.append(
            f'| {k} | {r["fwd"] * 1e3:.1f} | {r["fwd"] / ref["fwd"]:.2f}x | '
            f'{r["fwd+bwd"] * 1e3:.1f} | '
            f'{r["fwd+bwd"] / ref["fwd+bwd"]:.2f}x |'
        )
    return '\n'.join(lines)


def contention_table(
    quiet: Dict[str, Dict[str, float]], busy: Dict[str, Dict[str, float]]
) -> str:
    lines = [
        '\n| implementation | forward: alone -> contended (ms) | slowdown '
        '| forward+backward: alone -> contended (ms) | slowdown |',
        '|---|---|---|---|---|',
    ]
    for k in KINDS:
        a, b = quiet[k], busy[k]
        lines.append(
            f'| {k} | {a["fwd"] * 1e3:.1f} -> {b["fwd"] * 1e3:.1f} | '
            f'{b["fwd"] / a["fwd"]:.2f}x | {a["fwd+bwd"] * 1e3:.1f} -> '
            f'{b["fwd+bwd"] * 1e3:.1f} | '
            f'{b["fwd+bwd"] / a["fwd+bwd"]:.2f}x |'
        )
    return '\n'.join(lines)


def contended(size, args) -> Dict[str, Dict[str, float]]:
    """time_layer while another process keeps one core busy."""
    busy = subprocess.Popen([sys.executable, '-c', BUSY_LOOP])
    try:
        time.sleep(2.0)  # its torch import, then the loop runs
        return time_layer(size, args)
    finally:
        busy.terminate()
        busy.wait()


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument(
        '--maps',
        nargs='+',
        type=parse_size,
        default=[(100, 168), (80, 80)],
        metavar='HxW',
        help='input map sizes (default: 100x168, P3 of 800x1344, and 80x80, '
        'P3 of 640x640)',
    )
    p.add_argument('--threads', nargs='+', type=int, default=[1, 2])
    p.add_argument('--channels', type=int, default=256)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument(
        '--contention',
        action='store_true',
        help='also time the largest thread count with a second process '
        'busy on one core',
    )
    p.add_argument(
        '--out',
        default='work_dirs/benchmark_dcn_kernel/benchmark_dcn_kernel.md',
    )
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> str:
    args = parse_args(argv)
    import mmdet_dyhead  # noqa: F401  (the checkout's package, see ROOT)

    load_kernel()
    command = 'python benchmarks/benchmark_dcn_kernel.py ' + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    lines = [
        f'`{command}`',
        '',
        machine_info(torch.device('cpu'))
        + f'; load average at start {load_average()}',
    ]
    c = args.channels
    for size in args.maps:
        for threads in args.threads:
            torch.set_num_threads(threads)
            rows = time_layer(size, args)
            title = (
                f'one DCN layer {c}->{c} 3x3 on {size[0]}x{size[1]}, batch '
                f'1, {threads} thread(s) (load {load_average()})'
            )
            text = table(title, rows)
            print(text, flush=True)
            lines.append(text)
            if args.contention and threads == max(args.threads):
                busy = contended(size, args)
                title = (
                    f'the same, one core busy with another process (load '
                    f'{load_average()})'
                )
                text = table(title, busy) + '\n' + contention_table(rows, busy)
                print(text, flush=True)
                lines.append(text)
    lines.append(f'\nload average at end {load_average()}')
    text = '\n'.join(lines) + '\n'
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        f.write(text)
    print(f'written to {args.out}')
    return text


if __name__ == '__main__':
    main()
