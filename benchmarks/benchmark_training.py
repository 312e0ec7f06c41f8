"""One whole training iteration of ATSS-R50, with and without DyHead.

Three detectors, built from their configs with mmdet's default
initialisation (random backbone: ``init_cfg=None``; the timing does not
depend on the values, and DyHead starts from zero offsets as in training):

- ``ATSS (tower head)``: mmdet's ``atss_r50_fpn_1x_coco`` (FPN, 4-conv
  towers in the head);
- ``ATSS + DyHeadNeck-6``: this package's ``atss_r50_fpn_dyhead-6b_1x_coco``
  (FPN + 6 blocks, head without towers);
- ``ATSS + mmdet DyHead-6``: mmdet's ``dyhead/atss_r50_fpn_dyhead_1x_coco``,
  the same recipe with mmdet's own ``DyHead`` neck.

One iteration is what mmengine's ``Runner`` does per batch, with the data
already in memory: ``model.train_step(data, optim_wrapper)`` (data
preprocessor, forward, losses, backward, SGD step with the config's
optimizer). Every model pads to a multiple of 32 so all three see the same
input tensor (mmdet's DyHead config asks for 128, which would give its
model a larger one at 800x1344).

Timings are medians over ``--repeats`` with the models alternating inside
each repeat (round robin), so load changes hit them alike; read ratios
within one run. ``--memory`` adds the peak tensor memory of one iteration
(see ``benchmarks/benchmark_dyhead.py`` for how it is measured on CPU).
``--breakdown`` times the stages of one iteration separately: the forward
is cut at each stage boundary (the stage inputs become leaves; values are
unchanged), so the backward runs stage by stage from each stage's output
gradient and every stage's time is its own.

Examples::

    python benchmarks/benchmark_training.py  # work_dirs/benchmark_training/
    python benchmarks/benchmark_training.py --sizes 640x640 --batches 1 \\
        --threads 2 --repeats 2 --breakdown --memory
    python benchmarks/benchmark_training.py --device cuda --sizes 800x1344 \\
        --batches 2 --memory
"""

import argparse
import os
import os.path as osp
import shlex
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

# Run from a checkout: the repository root holds mmdet_dyhead, benchmarks/
# and projects/ (none of them is installed).
ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.benchmark_dyhead import (  # noqa: E402
    PeakMemory,
    load_average,
    machine_info,
    parse_size,
    round_robin,
)

MODELS = {
    'ATSS (tower head)': 'configs/atss/atss_r50_fpn_1x_coco.py',
    'ATSS + DyHeadNeck-6': 'configs/atss/atss_r50_fpn_dyhead-6b_1x_coco.py',
    'ATSS + mmdet DyHead-6': 'mmdet::dyhead/atss_r50_fpn_dyhead_1x_coco.py',
}
BASELINE = 'ATSS (tower head)'
OURS = 'ATSS + DyHeadNeck-6'
MMDET = 'ATSS + mmdet DyHead-6'


def build(name: str, device: torch.device, compile_neck: bool = False):
    """Model and optimizer wrapper of ``MODELS[name]``, default init
    (``compile_neck``: the DyHeadNeck built with ``compile=True``)."""
    from mmdet.registry import MODELS as REGISTRY
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper

    import mmdet_dyhead  # noqa: F401  (registers DyHeadNeck)

    register_all_modules()
    import mmdet
    from mmengine.logging import MMLogger

    # init_weights logs every parameter at INFO: keep the table readable.
    MMLogger.get_current_instance().setLevel('WARNING')
    path = MODELS[name]
    if path.startswith('mmdet::'):
        path = osp.join(
            osp.dirname(mmdet.__file__), '.mim', 'configs', path[7:]
        )
    else:
        path = osp.join(ROOT, path)
    cfg = Config.fromfile(path)
    cfg.model.backbone.init_cfg = None
    cfg.model.data_preprocessor.pad_size_divisor = 32
    if compile_neck:
        cfg.model.neck[1].compile = True
    model = REGISTRY.build(cfg.model)
    model.init_weights()
    model.to(device).train()
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    return model, optim_wrapper


def batch(size: Tuple[int, int], num: int, seed: int = 0) -> Dict[str, list]:
    """What a train dataloader yields: uint8 images and samples with boxes.

    Each image gets 8 random boxes of random classes, enough for every
    level's assigner and loss to run on positives.
    """
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    g = torch.Generator().manual_seed(seed)
    h, w = size
    inputs, samples = [], []
    for _ in range(num):
        inputs.append(torch.randint(0, 256, (3, h, w), generator=g).byte())
        xy = torch.rand(8, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 16 + torch.rand(8, 2, generator=g) * torch.tensor(
            [w * 0.3, h * 0.3]
        )
        sample = DetDataSample(
            metainfo=dict(
                img_shape=(h, w),
                ori_shape=(h, w),
                scale_factor=(1.0, 1.0),
                flip=False,
            )
        )
        sample.gt_instances = InstanceData(
            bboxes=torch.cat([xy, xy + wh], 1),
            labels=torch.randint(0, 80, (8,), generator=g),
        )
        sample.ignored_instances = InstanceData(
            bboxes=torch.zeros(0, 4), labels=torch.zeros(0).long()
        )
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def iteration(model, optim_wrapper, data) -> Callable[[], None]:
    """One Runner iteration: ``train_step`` (returns the log vars)."""

    def run():
        model.train_step(data, optim_wrapper)

    return run


def breakdown(model, optim_wrapper, data, device) -> Dict[str, float]:
    """Seconds per stage of one iteration (see the module docstring)."""
    from mmdet.models.utils import unpack_gt_instances

    def now():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def cut(tensors):
        """Stage inputs as leaves: each stage's backward is then its own."""
        return [t.detach().requires_grad_(t.requires_grad) for t in tensors]

    def backward(outputs, leaves):
        """Backward of one stage from the gradients its consumer left."""
        pairs = [(o, x.grad) for o, x in zip(outputs, leaves)]
        pairs = [(o, g) for o, g in pairs if g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])

    packed = model.data_preprocessor(data, True)
    inputs, samples = packed['inputs'], packed['data_samples']
    necks = (
        list(model.neck) if hasattr(model.neck, '__iter__') else [model.neck]
    )
    # The forward is cut at each stage boundary (values unchanged), so the
    # backward can run stage by stage and each stage's time is its own.
    # Hooks on the tensors would fire when the engine reaches them, which
    # depends on the graph's creation order, not on when a stage is done.
    fwd = [now()]
    feats = model.backbone(inputs)
    fwd.append(now())
    feats_in = cut(feats)
    fpn_out = necks[0](feats_in)
    fwd.append(now())
    out = fpn_in = cut(fpn_out)
    for neck in necks[1:]:
        out = neck(out)
    fwd.append(now())
    head_in = cut(out) if len(necks) > 1 else out
    head_out = model.bbox_head(head_in)
    fwd.append(now())
    gts, ignores, metas = unpack_gt_instances(samples)
    losses = model.bbox_head.loss_by_feat(*head_out, gts, metas, ignores)
    loss, _ = model.parse_losses(losses)
    fwd.append(now())
    optim_wrapper.optimizer.zero_grad()
    t = [now()]
    loss.backward()
    t.append(now())
    if len(necks) > 1:
        backward(out, head_in)
    t.append(now())
    backward(fpn_out, fpn_in)
    t.append(now())
    backward(feats, feats_in)
    t.append(now())
    optim_wrapper.step()
    optim_wrapper.zero_grad()
    t.append(now())
    return {
        'fwd backbone': fwd[1] - fwd[0],
        'fwd FPN': fwd[2] - fwd[1],
        'fwd DyHead': fwd[3] - fwd[2],
        'fwd head': fwd[4] - fwd[3],
        'loss': fwd[5] - fwd[4],
        'bwd head+loss': t[1] - t[0],
        'bwd DyHead': t[2] - t[1],
        'bwd FPN': t[3] - t[2],
        'bwd backbone': t[4] - t[3],
        'optimizer': t[5] - t[4],
    }


def run_table(args, device, size, num, threads, load, lines) -> None:
    torch.set_num_threads(threads)
    names = [n for n in MODELS if n in args.models]
    entries = {}
    for name in names:
        torch.manual_seed(0)
        model, wrapper = build(name, device)
        entries[name] = (model, wrapper)
    data = batch(size, num)
    med = round_robin(
        {n: iteration(m, w, data) for n, (m, w) in entries.items()},
        args.warmup,
        args.repeats,
        device,
    )
    mem = {}
    if args.memory:
        meter = PeakMemory(device)
        for n, (model, wrapper) in entries.items():
            mem[n] = meter.measure(iteration(model, wrapper, data))
    lines.append(
        f'#### {size[0]}x{size[1]}, batch {num}, {threads} thread(s) '
        f'(load average before: {load})'
    )
    lines.append('')
    head = '| detector | iteration (s) | vs tower head | vs mmdet DyHead |'
    sep = '|---|---|---|---|'
    if mem:
        head += ' peak memory (MB) | memory vs mmdet DyHead |'
        sep += '---|---|'
    lines += [head, sep]
    for n in names:
        row = f'| {n} | {med[n]:.2f} |'
        row += f' {med[n] / med[BASELINE]:.2f}x |' if BASELINE in med else ' |'
        row += (
            f' {med[MMDET] / med[n]:.2f}x faster |' if MMDET in med else ' |'
        )
        if mem:
            row += f' {mem[n]:.0f} |'
            row += f' {mem[n] / mem[MMDET]:.2f}x |' if MMDET in mem else ' |'
        lines.append(row)
    lines.append('')
    if args.breakdown:
        parts = {}
        for n, (model, wrapper) in entries.items():
            runs = [
                breakdown(model, wrapper, data, device)
                for _ in range(args.repeats)
            ]
            parts[n] = {
                s: statistics.median(r[s] for r in runs) for s in runs[0]
            }
        lines.append(
            f'Where one iteration goes ({size[0]}x{size[1]}, batch {num}, '
            f'{threads} thread(s); seconds, medians of {args.repeats}):'
        )
        lines.append('')
        lines.append('| stage | ' + ' | '.join(names) + ' |')
        lines.append('|---|' + '---|' * len(names))
        for s in parts[names[0]]:
            lines.append(
                f'| {s} | '
                + ' | '.join(f'{parts[n][s]:.3f}' for n in names)
                + ' |'
            )
        lines.append(
            '| total | '
            + ' | '.join(f'{sum(parts[n].values()):.3f}' for n in names)
            + ' |'
        )
        lines.append('')
    print('\n'.join(lines[-40:]), flush=True)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='One whole ATSS-R50 training iteration with and without '
        "DyHead (ours and mmdet's)."
    )
    parser.add_argument(
        '--sizes',
        type=parse_size,
        nargs='+',
        default=[(640, 640), (800, 1344)],
        help='Input sizes HxW. Default: 640x640 800x1344.',
    )
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 2])
    parser.add_argument(
        '--threads',
        type=int,
        nargs='+',
        default=[2, 1],
        help='torch intra-op threads (CPU), one table each.',
    )
    parser.add_argument(
        '--models',
        nargs='+',
        default=list(MODELS),
        choices=list(MODELS),
        help='Detectors to time. Default: all three.',
    )
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument(
        '--repeats',
        type=int,
        default=3,
        help='Timed iterations per model (median). Default: %(default)s.',
    )
    parser.add_argument(
        '--memory', action='store_true', help='Add peak memory columns.'
    )
    parser.add_argument(
        '--breakdown',
        action='store_true',
        help='Add a table of where each iteration goes.',
    )
    parser.add_argument('--device', default='cpu')
    parser.add_argument(
        '--out',
        default='work_dirs/benchmark_training/table.md',
        help='Markdown file for the tables. Default: %(default)s.',
    )
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> str:
    args = parse_args(argv)
    device = torch.device(args.device)
    cmd = 'python benchmarks/benchmark_training.py ' + ' '.join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    lines = [
        '### Training iteration: ATSS-R50 with and without DyHead',
        '',
        f'Command: `{cmd.strip()}`',
        '',
        machine_info(device),
        '',
    ]
    threads = (
        args.threads if device.type == 'cpu' else [torch.get_num_threads()]
    )
    for n_threads in threads:
        for size in args.sizes:
            for num in args.batches:
                run_table(
                    args, device, size, num, n_threads, load_average(), lines
                )
    text = '\n'.join(lines) + '\n'
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        f.write(text)
    print(f'Tables written to {args.out}')
    return text


if __name__ == '__main__':
    main()
