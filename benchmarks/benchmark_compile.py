"""torch.compile against eager: the DyHead neck, its dense floor, and one
training iteration of ATSS-R50 with and without DyHead.

Tables (ratios within one run; implementations alternate inside every
repeat, see ``benchmark_dyhead.round_robin``):

- **neck**: ``DyHeadNeck`` (6 blocks, 256 channels, the DCN operator
  ``mmdet_dyhead::modulated_deform_conv2d``, opaque to the compiler) eager and
  with ``compile=True`` (all blocks through one inductor-compiled block
  function), next to the dense floor (dense 3x3 convs with the neck's conv
  FLOPs, ``benchmark_dyhead.dense_floor``) eager and compiled as a whole
  with ``torch.compile``. Forward under ``no_grad`` and forward+backward.
- **dcn**: one DCN layer on P3: the DCN operator eager, the ``grid_sample``
  form (what ONNX files without ``DeformConv`` hold) eager and compiled,
  and the dense conv with its FLOPs.
- **train**: one ``train_step`` (preprocessing, forward, losses, backward,
  SGD step) of mmdet's ATSS-R50 (tower head) and of this package's ATSS-R50
  + DyHead-6, eager and with the DyHead neck compiled
  (``model.neck[1]`` built with ``compile=True``); with ``--full`` also
  both detectors' ``train_step`` compiled whole, which is what mmengine's
  ``compile=True`` config key does.

``compile (s)`` is the first call's time minus a steady call's, i.e. what
compiling costs once per process and input shape (inductor's on-disk cache
in ``/tmp/torchinductor_$USER`` makes later processes faster; clear it to
time a cold start). Peak memory is that of one steady call
(``benchmark_dyhead.PeakMemory``).

Examples::

    python benchmarks/benchmark_compile.py  # work_dirs/benchmark_compile/
    python benchmarks/benchmark_compile.py --sizes 640x640 --threads 1 2 \\
        --sections neck train --out docs/benchmark_compile.md
"""

import argparse
import copy
import os
import os.path as osp
import shlex
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.benchmark_dyhead import (  # noqa: E402
    PeakMemory,
    dense_floor,
    load_average,
    machine_info,
    parse_size,
    pyramid,
    round_robin,
)


def first_call(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(
    fns: Dict[str, Callable[[], None]], repeats: int, device
) -> Dict[str, Dict[str, float]]:
    """First-call time, steady median, peak memory per entry."""
    first = {k: first_call(fn) for k, fn in fns.items()}
    steady = round_robin(fns, 1, repeats, device)
    mem = PeakMemory(device)
    return {
        k: dict(
            first=first[k],
            steady=steady[k],
            compile=max(first[k] - steady[k], 0.0),
            mem=mem.measure(fns[k]),
        )
        for k in fns
    }


def table(title: str, rows: Dict[str, Dict[str, float]], ref: str) -> str:
    lines = [
        f'\n#### {title}\n',
        f'| implementation | time (s) | vs {ref} | compile (s) '
        '| peak mem (MB) |',
        '|---|---|---|---|---|',
    ]
    for k, r in rows.items():
        lines.append(
            f'| {k} | {r["steady"]:.3f} | '
            f'{r["steady"] / rows[ref]["steady"]:.2f}x | '
            f'{r["compile"]:.0f} | {r["mem"]:.0f} |'
        )
    return '\n'.join(lines)


def neck_section(args, device, size) -> List[str]:
    from mmdet_dyhead.models import DyHeadNeck

    torch.manual_seed(0)
    c, blocks = args.channels, args.blocks
    eager = DyHeadNeck(c, c, num_blocks=blocks, dcn_backend='torch')
    compiled = DyHeadNeck(
        c, c, num_blocks=blocks, dcn_backend='torch', compile=True
    )
    compiled.load_state_dict(eager.state_dict())
    floor, floor_w = dense_floor(c, blocks, device)
    floor_c = torch.compile(floor)
    feats = pyramid(1, c, size, device)
    out = []
    for mode in ('forward', 'forward+backward'):
        grad = mode != 'forward'
        for w in floor_w:
            w.requires_grad_(grad)
        inputs = [f.detach().clone().requires_grad_(grad) for f in feats]

        def call(fn):
            def run():
                if grad:
                    sum(o.sum() for o in fn(inputs)).backward()
                else:
                    with torch.no_grad():
                        fn(inputs)

            return run

        fns = {
            'DyHeadNeck eager': call(eager.train(grad)),
            'DyHeadNeck compile=True': call(compiled.train(grad)),
            'dense floor eager': call(floor),
            'dense floor compiled': call(floor_c),
        }
        rows = measure(fns, args.repeats, device)
        for k in ('DyHeadNeck eager', 'DyHeadNeck compile=True'):
            rows[k]['vs floor'] = rows[k]['steady'] / (
                rows['dense floor compiled']['steady']
                if 'compile' in k
                else rows['dense floor eager']['steady']
            )
        text = table(
            f'neck {mode}, {size[0]}x{size[1]}, {args.threads_now} '
            f'thread(s), {blocks} blocks, C={c}',
            rows,
            'DyHeadNeck eager',
        )
        text += '\n\nDyHeadNeck / dense floor in the same mode: eager ' + (
            f'{rows["DyHeadNeck eager"]["vs floor"]:.2f}x, compiled '
            f'{rows["DyHeadNeck compile=True"]["vs floor"]:.2f}x '
            f'(load {load_average()})'
        )
        print(text, flush=True)
        out.append(text)
    return out


def dcn_section(args, device, size) -> List[str]:
    """One DCN layer on P3 (stride 8) of ``size``: the DCN operator eager,
    the ``grid_sample`` form of ONNX exports, eager and compiled, and the
    dense 3x3 conv of the same FLOPs (forward)."""
    from mmdet_dyhead.deploy.dcn_onnx import grid_sample_deform_conv2d
    from mmdet_dyhead.ops import modulated_deform_conv2d

    torch.manual_seed(0)
    c = args.channels
    h, w = -(-size[0] // 8), -(-size[1] // 8)
    x = torch.randn(1, c, h, w, device=device)
    offset = torch.randn(1, 18, h, w, device=device) * 2
    mask = torch.rand(1, 9, h, w, device=device)
    weight = torch.randn(c, c, 3, 3, device=device) * 0.01

    def form(x, offset, mask, weight):
        return grid_sample_deform_conv2d(
            x, offset, mask, weight, None, (1, 1), (1, 1), (1, 1)
        )

    compiled = torch.compile(form)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()

        return run

    fns = {
        'DCN operator (eager)': no_grad(
            lambda: modulated_deform_conv2d(
                x, offset, mask, weight, backend='torch'
            )
        ),
        'grid_sample form, eager': no_grad(
            lambda: form(x, offset, mask, weight)
        ),
        'grid_sample form, compiled': no_grad(
            lambda: compiled(x, offset, mask, weight)
        ),
        'dense 3x3 conv (same FLOPs)': no_grad(
            lambda: torch.nn.functional.conv2d(x, weight, padding=1)
        ),
    }
    rows = measure(fns, args.repeats, device)
    text = table(
        f'one DCN layer, {c}->{c} channels on {h}x{w} (P3 of '
        f'{size[0]}x{size[1]}), forward, {args.threads_now} thread(s)',
        rows,
        'DCN operator (eager)',
    )
    print(text, flush=True)
    return [text]


def train_section(args, device, size) -> List[str]:
    from benchmarks.benchmark_training import BASELINE, OURS, batch, build

    data = batch(size, 1)
    entries = {}
    torch.manual_seed(0)
    base = build(BASELINE, device)
    ours = build(OURS, device)
    ours_neck = build(OURS, device, compile_neck=True)
    ours_neck[0].load_state_dict(ours[0].state_dict())
    entries[f'{BASELINE} eager'] = base
    entries[f'{OURS} eager'] = ours
    entries[f'{OURS}, neck compiled'] = ours_neck
    if args.full:
        for name, (model, wrapper) in ((BASELINE, base), (OURS, ours)):
            full = copy.deepcopy(model)
            full_wrapper = copy.copy(wrapper)
            full_wrapper.optimizer = torch.optim.SGD(
                full.parameters(), lr=0.01, momentum=0.9
            )
            full.train_step = torch.compile(full.train_step)
            entries[f'{name}, train_step compiled'] = (full, full_wrapper)

    def step(model, wrapper):
        def run():
            model.train_step(data, wrapper)

        return run

    fns = {k: step(*mw) for k, mw in entries.items()}
    rows = measure(fns, args.repeats, device)
    ref = f'{BASELINE} eager'
    text = table(
        f'training iteration, {size[0]}x{size[1]}, batch 1, '
        f'{args.threads_now} thread(s)',
        rows,
        ref,
    )
    print(text, flush=True)
    return [text]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--sizes', nargs='+', type=parse_size, default=[(640, 640)])
    p.add_argument('--threads', nargs='+', type=int, default=[1])
    p.add_argument(
        '--sections',
        nargs='+',
        choices=('neck', 'dcn', 'train'),
        default=['neck'],
    )
    p.add_argument('--channels', type=int, default=256)
    p.add_argument('--blocks', type=int, default=6)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument(
        '--full',
        action='store_true',
        help="also compile whole train_step (mmengine's compile=True)",
    )
    p.add_argument('--device', default='cpu')
    p.add_argument(
        '--out', default='work_dirs/benchmark_compile/benchmark_compile.md'
    )
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> str:
    args = parse_args(argv)
    device = torch.device(args.device)
    command = 'python benchmarks/benchmark_compile.py ' + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    lines = [
        f'`{command}`',
        '',
        machine_info(device) + f'; load average at start {load_average()}',
    ]
    for threads in args.threads:
        torch.set_num_threads(threads)
        args.threads_now = threads
        for size in args.sizes:
            if 'neck' in args.sections:
                lines += neck_section(args, device, size)
            if 'dcn' in args.sections:
                lines += dcn_section(args, device, size)
            if 'train' in args.sections:
                lines += train_section(args, device, size)
    lines.append(f'\nload average at end {load_average()}')
    text = '\n'.join(lines) + '\n'
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        f.write(text)
    print(f'written to {args.out}')
    return text


if __name__ == '__main__':
    main()
