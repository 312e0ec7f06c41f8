"""Quickstart: ATSS with and without DyHead, trained and COCO-evaluated on CPU.

Generates the synthetic shapes dataset, trains the two detectors of
configs/quickstart/ with mmengine's Runner, evaluates both with mmdet's
CocoMetric and prints (and writes) a table and a bar chart. Everything is
written under --out-dir (work_dirs/quickstart/ of the current directory
unless told).

Example:
    python tools/quickstart.py                     # the full run (minutes)
    python tools/quickstart.py --quick             # a smoke test (seconds)
    python tools/quickstart.py --iters 2000 --out-dir work_dirs/qs_long
"""

import argparse
import json
import os
import os.path as osp
import time
from typing import Dict, List, Optional

from ._paths import config_path

MARKER = 'quickstart.json'
MODELS = {
    'ATSS': 'atss_r18-tiny_fpn_synthetic.py',
    'ATSS + DyHead': 'atss_r18-tiny_fpn_dyhead-2b_synthetic.py',
}
METRICS = [
    ('AP', 'bbox_mAP'),
    ('AP50', 'bbox_mAP_50'),
    ('AP75', 'bbox_mAP_75'),
    ('APs', 'bbox_mAP_s'),
    ('APm', 'bbox_mAP_m'),
    ('APl', 'bbox_mAP_l'),
]
# --quick: enough to go through every stage, not to learn anything.
QUICK = dict(num_train=4, num_val=2, image_size=64, iters=2)


def config_dir() -> str:
    """configs/quickstart of the checkout, or of the installed package."""
    return config_path('quickstart')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        '--out-dir',
        default=osp.join('work_dirs', 'quickstart'),
        help='data, logs, checkpoints, the table and the chart go here '
        '(relative to the current directory)',
    )
    parser.add_argument(
        '--overwrite',
        action='store_true',
        help='write into a non-empty --out-dir that this script did not make',
    )
    parser.add_argument(
        '--quick',
        action='store_true',
        help=f'smoke test: {QUICK}, and every box kept '
        '(score_thr 0) so that CocoMetric has predictions to '
        'score',
    )
    parser.add_argument(
        '--iters',
        type=int,
        default=None,
        help='training iterations per detector (default: '
        "the configs' max_iters)",
    )
    parser.add_argument('--batch-size', type=int, default=None)
    parser.add_argument('--num-train', type=int, default=400)
    parser.add_argument('--num-val', type=int, default=100)
    parser.add_argument(
        '--image-size',
        type=int,
        default=None,
        help="default: the configs' image_size",
    )
    parser.add_argument('--seed', type=int, default=0)
    # One thread by default: these models are too small for intra-op
    # parallelism to pay off, and on a busy machine competing OpenMP threads
    # slow them down by orders of magnitude.
    parser.add_argument(
        '--threads', type=int, default=1, help='torch CPU threads'
    )
    parser.add_argument(
        '--models',
        nargs='+',
        default=list(MODELS),
        choices=list(MODELS),
        metavar='NAME',
        help=f'any of {list(MODELS)}',
    )
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if key in ('num_train', 'num_val') or getattr(args, key) is None:
                setattr(args, key, value)
    for key in (
        'iters',
        'batch_size',
        'num_train',
        'num_val',
        'image_size',
        'threads',
    ):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(
                f'--{key.replace("_", "-")} must be >= 1, got {value}.'
            )
    return args


def prepare_out_dir(out_dir: str, overwrite: bool, record: dict) -> None:
    """Create ``out_dir`` or check that it is ours; mark it as ours."""
    if osp.exists(out_dir) and not osp.isdir(out_dir):
        raise SystemExit(f'error: --out-dir {out_dir} is a file.')
    if (
        osp.isdir(out_dir)
        and os.listdir(out_dir)
        and not osp.isfile(osp.join(out_dir, MARKER))
        and not overwrite
    ):
        raise SystemExit(
            f'error: --out-dir {out_dir} is not empty and was not made by '
            f'the quickstart (no {MARKER}). Choose another --out-dir, or pass '
            f'--overwrite to write into it anyway (files with the same names '
            f'are replaced).'
        )
    os.makedirs(out_dir, exist_ok=True)
    with open(osp.join(out_dir, MARKER), 'w') as f:
        json.dump(record, f, indent=1)


def build_cfg(
    config_file: str, name: str, data: Dict[str, str], work_dir: str, args
):
    """Load a quickstart config and point it at the data and the schedule."""
    from mmengine.config import Config

    cfg = Config.fromfile(config_file)
    root = data['data_root'] + os.sep
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = root
    for evaluator in ('val_evaluator', 'test_evaluator'):
        cfg[evaluator].ann_file = data['val_ann']
        # Keeps the COCO-format detections next to the logs.
        cfg[evaluator].outfile_prefix = osp.join(work_dir, 'val_predictions')
    if args.quick:
        # An untrained model scores every box under mmdet's 0.05.
        cfg.model.test_cfg.score_thr = 0.0
    if args.image_size is not None:
        size = (args.image_size, args.image_size)
        for loader in (
            'train_dataloader',
            'val_dataloader',
            'test_dataloader',
        ):
            for step in cfg[loader].dataset.pipeline:
                if step.type == 'Resize':
                    step.scale = size
    if args.batch_size is not None:
        cfg.train_dataloader.batch_size = args.batch_size
    iters = args.iters or cfg.train_cfg.max_iters
    set_schedule(cfg, iters)
    cfg.work_dir = work_dir
    cfg.randomness = dict(seed=args.seed)
    # Two runners in one process need distinct logger/visualizer names.
    cfg.experiment_name = (
        f'{name.replace(" + ", "_").replace(" ", "_")}_'
        f'{time.strftime("%Y%m%d_%H%M%S")}'
    )
    if iters < 50:
        cfg.default_hooks.logger.interval = 1
    return cfg


def set_schedule(cfg, iters: int) -> None:
    """Warm-up then cosine decay over ``iters``; one checkpoint at the end."""
    warmup = max(1, min(100, iters // 10))
    base_lr = cfg.optim_wrapper.optimizer.lr
    cfg.train_cfg.max_iters = iters
    cfg.train_cfg.val_interval = iters
    cfg.param_scheduler = [
        dict(
            type='LinearLR',
            start_factor=0.01,
            by_epoch=False,
            begin=0,
            end=warmup,
        ),
        dict(
            type='CosineAnnealingLR',
            by_epoch=False,
            begin=warmup,
            end=iters,
            T_max=max(1, iters - warmup),
            eta_min=base_lr * 0.01,
        ),
    ]
    cfg.default_hooks.checkpoint.interval = iters


def evaluation_hook():
    """A hook that times the validation iterations and keeps the metrics."""
    from mmengine.hooks import Hook

    class EvaluationRecorder(Hook):
        priority = 'VERY_LOW'

        def __init__(self):
            self.times: List[float] = []
            self.images = 0
            self.metrics: Optional[dict] = None
            self.val_s = 0.0
            self._start = self._val_start = 0.0

        def before_val_epoch(self, runner):
            self._val_start = time.perf_counter()

        def before_val_iter(self, runner, batch_idx, data_batch=None):
            self._start = time.perf_counter()

        def after_val_iter(
            self, runner, batch_idx, data_batch=None, outputs=None
        ):
            self.times.append(time.perf_counter() - self._start)
            self.images += len(outputs)

        def after_val_epoch(self, runner, metrics=None):
            self.metrics = dict(metrics or {})
            self.val_s += time.perf_counter() - self._val_start

        def ms_per_image(self) -> float:
            # The first iterations pay for lazy allocations; skip them.
            skip = min(3, len(self.times) - 1)
            timed = self.times[skip:]
            per_iter = self.images / max(1, len(self.times))
            return 1000 * sum(timed) / max(1, len(timed)) / per_iter

    return EvaluationRecorder()


def train_and_evaluate(name: str, cfg) -> dict:
    """Train with Runner.from_cfg; the loop's final validation runs mmdet's
    CocoMetric on the val set, timed by :func:`evaluation_hook`."""
    from mmengine.runner import Runner

    print(
        f'\n=== {name}: training {cfg.train_cfg.max_iters} iterations, '
        f'then evaluating; logs in {cfg.work_dir} ===',
        flush=True,
    )
    runner = Runner.from_cfg(cfg)
    recorder = evaluation_hook()
    runner.register_hook(recorder)
    start = time.perf_counter()
    runner.train()
    total_s = time.perf_counter() - start
    if recorder.metrics is None:
        raise RuntimeError(
            f'{name}: the training loop did not validate; '
            'train_cfg.val_interval must divide max_iters.'
        )
    row = dict(
        model=name,
        train_s=total_s - recorder.val_s,
        ms_per_img=recorder.ms_per_image(),
        params_m=sum(p.numel() for p in runner.model.parameters()) / 1e6,
    )
    for label, key in METRICS:
        # CocoMetric returns no keys when a model predicted no box at all
        # (e.g. after a few iterations): that is an AP of 0. It reports -1
        # for a size bucket without ground truth: no AP (None, 'n/a').
        value = float(recorder.metrics.get(f'coco/{key}', 0.0))
        row[label] = None if value < 0 else 100 * value
    return row


def format_table(rows: List[dict]) -> str:
    """A markdown table: COCO AP (in %), train time, inference speed."""
    head = (
        ['Model']
        + [m for m, _ in METRICS]
        + ['Params (M)', 'Train time', 'Inference (ms/img)']
    )
    lines = [
        '| ' + ' | '.join(head) + ' |',
        '|' + '|'.join(['---'] + ['---:'] * (len(head) - 1)) + '|',
    ]
    for r in rows:
        cells = (
            [r['model']]
            + ['n/a' if r[m] is None else f'{r[m]:.1f}' for m, _ in METRICS]
            + [
                f'{r["params_m"]:.2f}',
                f'{r["train_s"] / 60:.1f} min',
                f'{r["ms_per_img"]:.1f}',
            ]
        )
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def plot(rows: List[dict], path: str) -> None:
    """Grouped bars of the six APs, one colour per model."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    labels = [m for m, _ in METRICS]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, r in enumerate(rows):
        xs = [
            k + (i - (len(rows) - 1) / 2) * width for k in range(len(labels))
        ]
        bars = ax.bar(
            xs,
            [r[m] or 0.0 for m in labels],
            width,
            label=f'{r["model"]} ({r["ms_per_img"]:.0f} ms/img)',
        )
        ax.bar_label(bars, fmt='%.1f', fontsize=7)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel('COCO AP (%)')
    ax.set_title('Synthetic shapes, val set (mmdet CocoMetric)')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> List[dict]:
    args = parse_args(argv)
    total_start = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    out_dir = osp.abspath(args.out_dir)
    prepare_out_dir(out_dir, args.overwrite, vars(args))

    from mmengine.config import Config

    import mmdet_dyhead  # noqa: F401  (registers DyHeadNeck)
    from mmdet_dyhead.testing import generate_synthetic_coco

    image_size = (
        args.image_size
        or Config.fromfile(osp.join(config_dir(), MODELS['ATSS'])).image_size
    )
    start = time.perf_counter()
    try:
        # reuse: a rerun with the same options skips drawing; other options
        # replace the earlier data (the folder is ours).
        data = generate_synthetic_coco(
            osp.join(out_dir, 'data'),
            num_train=args.num_train,
            num_val=args.num_val,
            image_size=image_size,
            seed=args.seed,
            overwrite=True,
            reuse=True,
        )
    except (ValueError, TypeError, FileExistsError) as err:
        raise SystemExit(f'error: {err}')
    print(
        f'data: {args.num_train} train / {args.num_val} val images of '
        f'{image_size} px in {data["data_root"]} '
        f'({time.perf_counter() - start:.1f} s)',
        flush=True,
    )

    rows = []
    for name in args.models:
        work_dir = osp.join(out_dir, osp.splitext(MODELS[name])[0])
        cfg = build_cfg(
            osp.join(config_dir(), MODELS[name]), name, data, work_dir, args
        )
        rows.append(train_and_evaluate(name, cfg))

    table = format_table(rows)
    total_s = time.perf_counter() - total_start
    with open(osp.join(out_dir, 'results.md'), 'w') as f:
        f.write(table + f'\n\nTotal wall time: {total_s / 60:.1f} min\n')
    with open(osp.join(out_dir, 'results.json'), 'w') as f:
        json.dump(
            dict(rows=rows, total_s=total_s, args=vars(args)), f, indent=1
        )
    plot(rows, osp.join(out_dir, 'results.png'))
    print('\n' + table)
    print(
        f'\nTotal wall time {total_s / 60:.1f} min. Table: '
        f'{osp.join(out_dir, "results.md")}, chart: '
        f'{osp.join(out_dir, "results.png")}'
    )
    return rows
