"""Time mmdet's DyHead against DyHeadNeck (each DCN backend), side by side.

Every implementation runs on the same 5-level FPN-shaped input (strides
8..128) in the same process, round-robin within each repeat so machine load
hits all of them alike; the tables report medians after warm-up and the
ratio to mmdet's DyHead from the same run. Also timed:

- the "floor": dense 3x3 convolutions with exactly the neck's conv FLOPs
  (per block and level: offset conv + mid/low/high convs at the DCN
  geometry), i.e. what the neck would cost if deformable sampling were free;
- one DCN layer at the finest level against the equal-FLOP dense conv;
- scaling of our neck with image size and number of blocks.

Peak memory on CPU is the peak of the bytes held by live tensors during one
call, over those held before it: every allocation and free the CPU
allocator reports to ``torch.profiler`` (``profile_memory=True``), replayed
in order. (The process's resident set is too coarse for this: glibc keeps
freed pages, so mmdet's and our necks showed the same figure.) On CUDA it is
``torch.cuda.max_memory_allocated`` over the allocation before the run.

Examples::

    python benchmarks/benchmark_dyhead.py  # work_dirs/benchmark_dyhead/
    python benchmarks/benchmark_dyhead.py --out docs/benchmarks.md  # the doc
    python benchmarks/benchmark_dyhead.py --quick --out /tmp/b.md
    python benchmarks/benchmark_dyhead.py --sizes 800x1344 --batches 1 \
        --repeats 5
"""

import argparse
import os
import os.path as osp
import platform
import re
import shlex
import statistics
import sys
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

STRIDES = (8, 16, 32, 64, 128)


# ----------------------------------------------------------------- machine
def machine_info(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            m = re.search(r'model name\s*:\s*(.*)', f.read())
            cpu = m.group(1) if m else cpu
    except OSError:
        pass
    parts = [
        f'CPU: {cpu}, {os.cpu_count()} logical cores, '
        f'torch threads as in each section',
        f'torch {torch.__version__}',
    ]
    try:
        import mmcv
        import mmdet

        parts.append(f'mmcv {mmcv.__version__}, mmdet {mmdet.__version__}')
    except ImportError:
        pass
    if device.type == 'cuda':
        parts.append(f'GPU: {torch.cuda.get_device_name(device)}')
    return '; '.join(parts)


def load_average() -> str:
    try:
        return ', '.join(f'{v:.2f}' for v in os.getloadavg())
    except OSError:
        return 'n/a'


# ----------------------------------------------------------------- memory
class PeakMemory:
    """Peak extra tensor memory of one call, see the module docstring."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def measure(self, fn: Callable[[], None]) -> float:
        """MB; NaN where the profiler reports no allocation events."""
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return (
                torch.cuda.max_memory_allocated(self.device) - base
            ) / 2**20
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with profile(
            activities=[ProfilerActivity.CPU], profile_memory=True
        ) as prof:
            fn()
        events = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.tag == _EventType.Allocation:
                events.append(
                    (node.start_time_ns, node.extra_fields.alloc_size)
                )
        if not events:
            return float('nan')
        live = peak = 0
        for _, size in sorted(events):
            live += size
            peak = max(peak, live)
        return peak / 2**20


# ----------------------------------------------------------------- timing
def timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    if device.type == 'cuda':

        def run(fn):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1000

        return run

    def run(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


def round_robin(
    fns: Dict[str, Callable[[], None]],
    warmup: int,
    repeats: int,
    device: torch.device,
) -> Dict[str, float]:
    """Median seconds per entry; entries alternate inside every repeat."""
    clock = timer(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(clock(fn))
    return {k: statistics.median(v) for k, v in times.items()}


# ----------------------------------------------------------------- models
def pyramid(
    batch: int, channels: int, size: Tuple[int, int], device: torch.device
) -> List[torch.Tensor]:
    """FPN-shaped levels: stride 8 map of an image of ``size``, then
    halving.
    """
    h, w = -(-size[0] // STRIDES[0]), -(-size[1] // STRIDES[0])
    feats = []
    for _ in STRIDES:
        feats.append(torch.randn(batch, channels, h, w, device=device))
        h, w = -(-h // 2), -(-w // 2)
    return feats


def build_models(
    channels: int,
    blocks: int,
    backends: Sequence[str],
    device: torch.device,
    with_mmdet: bool,
):
    """mmdet's DyHead (random non-trivial weights) and ours loaded from it."""
    from mmdet_dyhead.models import DyHeadNeck

    models = {}
    state = None
    if with_mmdet:
        from mmdet.models.necks import DyHead

        ref = DyHead(
            channels, channels, num_blocks=blocks, zero_init_offset=False
        )
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if 'spatial_conv_offset' in name:
                    p.normal_(0, 0.05)  # offsets of a few pixels
        models['mmdet DyHead (mmcv)'] = ref.to(device)
        state = ref.state_dict()
    for backend in backends:
        ours = DyHeadNeck(
            channels, channels, num_blocks=blocks, dcn_backend=backend
        )
        if state is not None:
            ours.load_state_dict(state)
        models[f'ours ({backend})'] = ours.to(device)
    return models


def dense_floor(channels: int, blocks: int, device: torch.device):
    """Dense convs with the neck's conv FLOPs (offset, mid, low, high)."""
    weights = [
        torch.randn(co, channels, 3, 3, device=device) * 0.01
        for co in (27, channels, channels, channels)
    ]

    def forward(feats):
        outs = []
        for _ in range(blocks):
            outs = []
            for lvl, f in enumerate(feats):
                y = F.conv2d(f, weights[1], padding=1)
                off = F.conv2d(f, weights[0], padding=1)
                y = y + off.sum() * 0
                if lvl > 0:
                    y = y + F.conv2d(
                        feats[lvl - 1], weights[2], stride=2, padding=1
                    )
                if lvl < len(feats) - 1:
                    hi = F.conv2d(feats[lvl + 1], weights[3], padding=1)
                    y = y + F.interpolate(
                        hi,
                        size=f.shape[-2:],
                        mode='bilinear',
                        align_corners=True,
                    )
                outs.append(y)
            feats = outs
        return outs

    return forward, weights


def max_rel_err(outs, ref) -> float:
    return max(
        ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        for a, b in zip(outs, ref)
    )


# ----------------------------------------------------------------- sections
def neck_table(args, device, size, batch, lines):
    with_mmdet = not args.no_mmdet
    channels = args.channels
    fwd_models = build_models(
        channels, args.blocks, args.backends, device, with_mmdet
    )
    for m in fwd_models.values():
        m.eval()
    floor_fwd, _ = dense_floor(channels, args.blocks, device)
    feats = pyramid(batch, channels, size, device)
    with torch.no_grad():
        outs = {k: m(feats) for k, m in fwd_models.items()}
    errs = {}
    if with_mmdet:
        ref = outs['mmdet DyHead (mmcv)']
        errs = {k: max_rel_err(o, ref) for k, o in outs.items()}
    del outs

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn(feats)

        return run

    fns = {k: no_grad(m) for k, m in fwd_models.items()}
    fns['dense floor'] = no_grad(floor_fwd)
    fwd = round_robin(fns, args.warmup, args.repeats, device)
    mem = PeakMemory(device)
    fwd_mem = {k: mem.measure(fn) for k, fn in fns.items()}
    del fns

    bwd = bwd_mem = {}
    if not args.no_backward:
        bwd_models = (
            fwd_models
            if args.bwd_blocks == args.blocks
            else build_models(
                channels, args.bwd_blocks, args.backends, device, with_mmdet
            )
        )
        floor_bwd, floor_w = dense_floor(channels, args.bwd_blocks, device)
        for w in floor_w:
            w.requires_grad_()
        grad_feats = [f.detach().clone().requires_grad_() for f in feats]

        def train_step(fn):
            def run():
                outs = fn(grad_feats)
                sum(o.sum() for o in outs).backward()

            return run

        fns = {k: train_step(m.train()) for k, m in bwd_models.items()}
        fns['dense floor'] = train_step(floor_bwd)
        bwd = round_robin(fns, args.warmup, args.bwd_repeats, device)
        bwd_mem = {k: mem.measure(fn) for k, fn in fns.items()}
        for m in bwd_models.values():
            m.zero_grad(set_to_none=True)
        del fns

    ref_key = 'mmdet DyHead (mmcv)'
    h0, w0 = feats[0].shape[-2:]
    lines.append(
        f'\n#### {size[0]}x{size[1]}, batch {batch} '
        f'(P3 {h0}x{w0}, C={channels}; forward {args.blocks} blocks, '
        f'forward+backward {args.bwd_blocks} blocks)\n'
    )
    lines.append(
        '| implementation | fwd (s) | fwd speed-up vs mmdet '
        '| fwd peak mem (MB) '
        '| fwd+bwd (s) | fwd+bwd speed-up vs mmdet | fwd+bwd peak mem (MB) '
        '| mem vs mmdet (fwd / fwd+bwd) | max rel err vs mmdet |'
    )
    lines.append('|---|---|---|---|---|---|---|---|---|')
    for k in fwd:

        def ratio(d, inverse=False):
            if ref_key not in d or k not in d or not d[k]:
                return '-'
            value = (d[k] / d[ref_key]) if inverse else (d[ref_key] / d[k])
            return f'{value:.2f}x'

        b = f'{bwd[k]:.3f}' if k in bwd else '-'
        bm = f'{bwd_mem[k]:.0f}' if k in bwd_mem else '-'
        err = f'{errs[k]:.1e}' if k in errs else '-'
        lines.append(
            f'| {k} | {fwd[k]:.3f} | {ratio(fwd)} | {fwd_mem[k]:.0f} | {b} '
            f'| {ratio(bwd)} | {bm} | {ratio(fwd_mem, True)} / '
            f'{ratio(bwd_mem, True)} | {err} |'
        )
    print('\n'.join(lines[-(len(fwd) + 3) :]), flush=True)


def dcn_layer_table(args, device, size, lines):
    from mmdet_dyhead.ops import mmcv_ops_available, modulated_deform_conv2d

    c = args.channels
    h, w = -(-size[0] // 8), -(-size[1] // 8)
    x = torch.randn(1, c, h, w, device=device)
    offset = torch.randn(1, 18, h, w, device=device)
    mask = torch.rand(1, 9, h, w, device=device)
    weight = torch.randn(c, c, 3, 3, device=device) * 0.02
    impls = {
        'dense conv2d (floor)': lambda a, o, m, wt: F.conv2d(a, wt, padding=1)
    }
    for backend in args.backends:
        if backend == 'mmcv' and not mmcv_ops_available():
            continue
        impls[f'DCN ours ({backend})'] = lambda a, o, m, wt, b=backend: (
            modulated_deform_conv2d(a, o, m, wt, backend=b)
        )
    leaves = [t.clone().requires_grad_() for t in (x, offset, mask, weight)]
    grad = torch.randn(1, c, h, w, device=device)

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn(x, offset, mask, weight)

        return run

    def fwd_bwd(fn):
        def run():
            fn(*leaves).backward(grad)

        return run

    f = round_robin(
        {k: fwd(v) for k, v in impls.items()},
        args.warmup,
        args.repeats,
        device,
    )
    b = round_robin(
        {k: fwd_bwd(v) for k, v in impls.items()},
        args.warmup,
        args.bwd_repeats,
        device,
    )
    floor = 'dense conv2d (floor)'
    lines.append(
        f'\n#### One 3x3 layer, {c}->{c} channels, on a {h}x{w} map (P3 of '
        f'{size[0]}x{size[1]}), batch 1\n'
    )
    lines.append(
        '| implementation | fwd (ms) | fwd / dense '
        '| fwd+bwd (ms) | fwd+bwd / dense |'
    )
    lines.append('|---|---|---|---|---|')
    for k in impls:
        lines.append(
            f'| {k} | {f[k] * 1e3:.1f} | {f[k] / f[floor]:.2f}x | '
            f'{b[k] * 1e3:.1f} | {b[k] / b[floor]:.2f}x |'
        )
    print('\n'.join(lines[-(len(impls) + 3) :]), flush=True)


def scaling_tables(args, device, lines):
    from mmdet_dyhead.models import DyHeadNeck

    c = args.channels
    backend = args.backends[0]
    neck = (
        DyHeadNeck(c, c, num_blocks=args.blocks, dcn_backend=backend)
        .eval()
        .to(device)
    )
    fns, pixels = {}, {}
    for size in args.scaling_sizes:
        feats = pyramid(1, c, size, device)
        pixels[size] = sum(f.shape[-2] * f.shape[-1] for f in feats)
        fns[size] = lambda fs=feats: neck(fs)
    with torch.no_grad():
        t = round_robin(fns, args.warmup, args.repeats, device)
    lines.append(
        f'\n#### Time vs image size (ours, {backend}, {args.blocks} blocks, '
        f'batch 1, forward)\n'
    )
    lines.append('| image | pyramid pixels | fwd (s) | us per pyramid pixel |')
    lines.append('|---|---|---|---|')
    for size in args.scaling_sizes:
        lines.append(
            f'| {size[0]}x{size[1]} | {pixels[size]} | {t[size]:.3f} | '
            f'{t[size] / pixels[size] * 1e6:.1f} |'
        )
    size = args.scaling_sizes[len(args.scaling_sizes) // 2]
    feats = pyramid(1, c, size, device)
    fns = {}
    for n in args.scaling_blocks:
        m = (
            DyHeadNeck(c, c, num_blocks=n, dcn_backend=backend)
            .eval()
            .to(device)
        )
        fns[n] = lambda m=m: m(feats)
    with torch.no_grad():
        t = round_robin(fns, args.warmup, args.repeats, device)
    lines.append(
        f'\n#### Time vs number of blocks (ours, {backend}, '
        f'{size[0]}x{size[1]}, '
        f'batch 1, forward)\n'
    )
    lines.append('| blocks | fwd (s) | s per block |')
    lines.append('|---|---|---|')
    for n in args.scaling_blocks:
        lines.append(f'| {n} | {t[n]:.3f} | {t[n] / n:.3f} |')
    print('\n'.join(lines[-(len(args.scaling_blocks) + 3) :]), flush=True)


# ----------------------------------------------------------------- main
def parse_size(text: str) -> Tuple[int, int]:
    h, w = text.lower().split('x')
    return int(h), int(w)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument(
        '--sizes',
        nargs='+',
        type=parse_size,
        default=[(800, 1344), (512, 512)],
        metavar='HxW',
        help='image sizes of the neck tables (pyramid strides 8..128); '
        'the first also sizes the DCN-layer table (default: 800x1344 '
        '512x512)',
    )
    p.add_argument(
        '--batches',
        nargs='+',
        type=int,
        default=[1, 2],
        metavar='N',
        help='batch sizes of the neck tables (default: 1 2)',
    )
    p.add_argument(
        '--blocks',
        type=int,
        default=6,
        metavar='N',
        help='blocks for forward timing (default: 6)',
    )
    p.add_argument(
        '--bwd-blocks',
        type=int,
        default=1,
        metavar='N',
        help='blocks for forward+backward timing (default: 1; mmcv CPU '
        'backward is slow; the neck is a stack of identical blocks, so '
        'the ratio per block is the ratio of the neck)',
    )
    p.add_argument(
        '--channels',
        type=int,
        default=256,
        metavar='C',
        help='channels of every pyramid level, in and out (default: 256)',
    )
    p.add_argument(
        '--backends',
        nargs='+',
        default=['torch', 'mmcv'],
        choices=['torch', 'mmcv', 'auto'],
        help="DyHeadNeck's dcn_backend values to time (default: torch "
        "mmcv; 'mmcv' is dropped when mmcv has no compiled ops); the first "
        'is used for the scaling tables',
    )
    p.add_argument(
        '--repeats',
        type=int,
        default=3,
        metavar='N',
        help='timed forward repeats per implementation, median reported '
        '(default: 3)',
    )
    p.add_argument(
        '--bwd-repeats',
        type=int,
        default=2,
        metavar='N',
        help='timed forward+backward repeats per implementation (default: 2)',
    )
    p.add_argument(
        '--warmup',
        type=int,
        default=1,
        metavar='N',
        help='untimed runs of each implementation before timing (default: 1)',
    )
    p.add_argument(
        '--threads',
        type=int,
        nargs='+',
        default=[2],
        metavar='N',
        help='CPU threads (default: 2); several values repeat every table '
        'per value',
    )
    p.add_argument(
        '--device',
        default='cuda' if torch.cuda.is_available() else 'cpu',
        help='torch device to run on (default: cuda if available, else cpu)',
    )
    p.add_argument(
        '--no-backward',
        action='store_true',
        help='neck tables: time the forward pass only',
    )
    p.add_argument(
        '--no-mmdet',
        action='store_true',
        help="leave out mmdet's DyHead (set anyway when mmcv has no "
        'compiled ops)',
    )
    p.add_argument(
        '--no-scaling',
        action='store_true',
        help='skip the time-vs-size and time-vs-blocks tables',
    )
    p.add_argument(
        '--scaling-sizes',
        nargs='+',
        type=parse_size,
        default=[
            (384, 640),
            (512, 512),
            (640, 1024),
            (800, 1344),
            (1024, 1600),
        ],
        metavar='HxW',
        help='image sizes of the time-vs-size table; the middle one is '
        'used for the time-vs-blocks table (default: 384x640 512x512 '
        '640x1024 800x1344 1024x1600)',
    )
    p.add_argument(
        '--scaling-blocks',
        nargs='+',
        type=int,
        default=[1, 2, 4, 6, 8],
        metavar='N',
        help='block counts of the time-vs-blocks table (default: 1 2 4 6 8)',
    )
    p.add_argument(
        '--quick',
        action='store_true',
        help='tiny smoke run: 32 channels, one small size, 1 repeat',
    )
    p.add_argument(
        '--out',
        default=osp.join('work_dirs', 'benchmark_dyhead', 'benchmarks.md'),
        metavar='FILE',
        help='markdown file the tables are written to (default: '
        '%(default)s, under the current directory; docs/benchmarks.md '
        'is written with --out docs/benchmarks.md)',
    )
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.batches, args.channels = [(64, 96)], [1], 32
        args.blocks, args.bwd_blocks, args.repeats, args.bwd_repeats = (
            2,
            1,
            1,
            1,
        )
        args.warmup = 0
        args.scaling_sizes, args.scaling_blocks = (
            [(64, 96), (128, 192)],
            [1, 2],
        )
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    import mmdet_dyhead  # noqa: F401
    from mmdet_dyhead.ops import mmcv_ops_available

    if not mmcv_ops_available():
        args.backends = [b for b in args.backends if b != 'mmcv'] or ['torch']
        args.no_mmdet = True
    # The command line as given, so the file says how it was made (with
    # --out, for the copy in docs/).
    command = shlex.join(
        ['python', 'benchmarks/benchmark_dyhead.py']
        + list(sys.argv[1:] if argv is None else argv)
    )
    lines = [
        '# DyHead neck benchmarks',
        '',
        f'Command: `{command}`',
        '',
        f'Machine: {machine_info(device)}',
        '',
        'Times are medians of the repeats after warm-up, wall clock '
        '(CUDA events on GPU); speed-up = mmdet time / our time, both '
        'from this run. Peak memory: peak of live tensor bytes '
        'during one call, over those held before it (CPU: torch.profiler '
        'allocation events; CUDA: max_memory_allocated). Written by '
        '`benchmarks/benchmark_dyhead.py`.',
        '',
    ]
    for threads in args.threads:
        torch.set_num_threads(threads)
        start = time.time()
        lines.append(f'## {threads} CPU thread(s)\n')
        lines.append(f'Load average at start (1/5/15 min): {load_average()}\n')
        lines.append('### Neck: mmdet 3.3 DyHead vs DyHeadNeck')
        for size in args.sizes:
            for batch in args.batches:
                neck_table(args, device, size, batch, lines)
        lines.append('\n### One DCN layer vs the equal-FLOP dense convolution')
        dcn_layer_table(args, device, args.sizes[0], lines)
        if not args.no_scaling:
            lines.append('\n### Scaling')
            scaling_tables(args, device, lines)
        lines.append(
            f'\nLoad average at end: {load_average()}; time for this '
            f'thread count {time.time() - start:.0f} s.\n'
        )
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        f.write('\n'.join(lines))
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
