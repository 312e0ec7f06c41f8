"""A/B study: ATSS with and without DyHead, a fair comparison on CPU.

The protocol mirrors the paper's regime at CPU scale:

1. **Data**: the synthetic shapes set with three splits: train, val (the
   split every tuning decision looked at) and test (the reported numbers).
2. **Pre-training, once**: the backbone and FPN are trained on the train
   split inside a detector whose head is not under test (RetinaNet with one
   stacked conv, ``projects/ab_study/configs/*_pretrain.py``), the way
   both models of the paper start from the same ImageNet weights. The
   weights are cached in ``<out-dir>/pretrain/`` and reused while the
   options match.
3. **Fresh heads**: ATSS (4 + 4 stacked convs) and ATSS + DyHead (DyHead
   blocks, no stacked convs) start from those weights and train with the
   same schedule, optimizer and iterations, once per seed (``--seeds``).
   Runs go to ``--workers`` processes of one thread each.
4. **Report**: test-split COCO AP (mmdet's CocoMetric), mean and spread over
   the seeds, printed and written as a table, JSON and a chart.

Example:
    python projects/ab_study/ab_study.py              # the full run (minutes)
    python projects/ab_study/ab_study.py --quick      # a smoke test (seconds)
    python projects/ab_study/ab_study.py --seeds 0 1 2 3 4 \
        --out-dir work_dirs/ab5
"""

import argparse
import copy
import json
import math
import os
import os.path as osp
import sys
import time
from typing import Dict, List, Optional

# Run from a checkout: the repository root holds mmdet_dyhead and projects/.
ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# The shared pre-training (not under test), beside this file.
PRETRAIN_CONFIG = osp.join(
    osp.dirname(osp.abspath(__file__)),
    'configs',
    'retinanet_r18-tiny_fpn_synthetic_pretrain.py',
)

MARKER = 'ab_study.json'
MODELS = {
    'ATSS': 'atss_r18-tiny_fpn_synthetic.py',
    'ATSS + DyHead': 'atss_r18-tiny_fpn_dyhead-2b_synthetic.py',
}
PRETRAINED_FILE = 'backbone_fpn.pth'
METRICS = [
    ('AP', 'bbox_mAP'),
    ('AP50', 'bbox_mAP_50'),
    ('AP75', 'bbox_mAP_75'),
    ('APs', 'bbox_mAP_s'),
    ('APm', 'bbox_mAP_m'),
    ('APl', 'bbox_mAP_l'),
]
# Object-size octaves (side = sqrt of the COCO area, in pixels of the
# 192 px input) for the per-level analysis: ATSS's anchors are 4 x stride
# (32, 64, 128 px on P3-P5), so each octave is mostly served by one level.
OCTAVES = [
    ('<16', 0, 16),
    ('16-32', 16, 32),
    ('32-64', 32, 64),
    ('64-128', 64, 128),
    ('>128', 128, 1e5),
]
OCTAVE_TITLE = (
    'AP by object size (side = sqrt(area), in input pixels), mean over seeds'
)
# --quick: enough to go through every stage, not to learn anything. 160 px
# is the least that leaves P7 (stride 128) 2 x 2: the baseline head's
# GroupNorm with one channel per group needs more than one value.
QUICK = dict(
    num_train=4,
    num_val=2,
    num_test=2,
    image_size=160,
    iters=2,
    pretrain_iters=2,
    seeds=[0],
)


def config_dir() -> str:
    """configs/quickstart of the checkout: the two compared detectors."""
    return osp.join(ROOT, 'configs', 'quickstart')


def parse_args(argv=None):
    # Imported here: the spawned workers import this module too, and their
    # imports should print (warnings) into their own logs.
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        '--out-dir',
        default=osp.join('work_dirs', 'ab_study'),
        help='data, pre-trained weights, logs, checkpoints, the table and '
        'the chart go here (relative to the current directory)',
    )
    parser.add_argument(
        '--overwrite',
        action='store_true',
        help='write into a non-empty --out-dir that this script did not make',
    )
    parser.add_argument(
        '--quick',
        action='store_true',
        help=f'smoke test: {QUICK}, and every box kept (score_thr 0) so '
        'that CocoMetric has predictions to score',
    )
    parser.add_argument(
        '--iters',
        type=int,
        default=None,
        help='training iterations of each compared detector (default: the '
        "configs' max_iters)",
    )
    parser.add_argument(
        '--pretrain-iters',
        type=int,
        default=None,
        help='iterations of the shared pre-training (default: the pretrain '
        "config's max_iters)",
    )
    parser.add_argument(
        '--seeds',
        type=int,
        nargs='+',
        default=None,
        help='one run of each detector per seed (head initialisation and '
        'data order); default: 0 1 2',
    )
    parser.add_argument('--batch-size', type=int, default=None)
    parser.add_argument('--num-train', type=int, default=400)
    parser.add_argument('--num-val', type=int, default=100)
    parser.add_argument('--num-test', type=int, default=200)
    parser.add_argument(
        '--image-size',
        type=int,
        default=None,
        help="default: the configs' image_size",
    )
    parser.add_argument(
        '--data-seed',
        type=int,
        default=0,
        help='seed of the synthetic data and of the pre-training',
    )
    parser.add_argument(
        '--workers',
        type=int,
        default=2,
        help='trainings run at once, one process each',
    )
    # One thread per process by default: these models are too small for
    # intra-op parallelism to pay off, and on a busy machine competing
    # OpenMP threads slow them down by orders of magnitude.
    parser.add_argument(
        '--threads', type=int, default=1, help='torch CPU threads per process'
    )
    parser.add_argument(
        '--eval-split',
        choices=['test', 'val'],
        default='test',
        help="the split the table reports: 'test' (the default and the "
        "result), or 'val' for tuning experiments (the test split is then "
        'not evaluated at all)',
    )
    parser.add_argument(
        '--run-name',
        default='',
        help='runs and results go to <out-dir>/<run-name>/, sharing the data '
        'and pre-trained weights of <out-dir> (for experiments)',
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        default={},
        metavar='KEY=VALUE',
        help='overrides merged into the config of every compared detector '
        "(mmengine's --cfg-options syntax)",
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
            if key in ('num_train', 'num_val', 'num_test') or (
                getattr(args, key) is None
            ):
                setattr(args, key, value)
    if args.seeds is None:
        args.seeds = [0, 1, 2]
    for key in (
        'iters',
        'pretrain_iters',
        'batch_size',
        'num_train',
        'num_val',
        'num_test',
        'image_size',
        'workers',
        'threads',
    ):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(
                f'--{key.replace("_", "-")} must be >= 1, got {value}.'
            )
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        parser.error(
            f'--seeds must be distinct non-negative integers, got '
            f'{args.seeds}.'
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
            f'the A/B study (no {MARKER}). Choose another --out-dir, or pass '
            f'--overwrite to write into it anyway (files with the same names '
            f'are replaced).'
        )
    os.makedirs(out_dir, exist_ok=True)
    with open(osp.join(out_dir, MARKER), 'w') as f:
        json.dump(record, f, indent=1)


def prepare_data(args, out_dir: str) -> Dict[str, str]:
    """The three splits in ``out_dir/data`` (reused if the options match)."""
    from mmengine.config import Config

    from projects.synthetic_coco import generate_synthetic_coco

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
            num_test=args.num_test,
            image_size=image_size,
            seed=args.data_seed,
            overwrite=True,
            reuse=True,
        )
    except (ValueError, TypeError, FileExistsError) as err:
        raise SystemExit(f'error: {err}')
    print(
        f'data: {args.num_train} train / {args.num_val} val / '
        f'{args.num_test} test images of {image_size} px in '
        f'{data["data_root"]} ({time.perf_counter() - start:.1f} s)',
        flush=True,
    )
    return data


def build_cfg(
    config_file: str,
    name: str,
    data: Dict[str, str],
    work_dir: str,
    args,
    seed: Optional[int] = None,
    pretrained: Optional[str] = None,
    cfg_options: Optional[dict] = None,
):
    """Load a quickstart config and point it at the data and the schedule.

    Args:
        config_file (str): A config of ``configs/quickstart/``.
        name (str): The run's name (logger and visualizer names).
        data (dict): Paths from ``generate_synthetic_coco``; with
            ``test_ann`` the test loop evaluates the test split.
        work_dir (str): The run's work_dir.
        args (argparse.Namespace): ``image_size``, ``batch_size``,
            ``iters``, ``quick`` and (unless ``seed`` is given) ``seed``.
        seed (int, optional): Training seed; default ``args.seed``.
        pretrained (str, optional): A checkpoint with ``backbone.*`` and
            ``neck.*`` (FPN) weights to start from, loaded by the backbone's
            and the FPN's ``init_cfg``.
        cfg_options (dict, optional): ``--cfg-options``-style overrides,
            merged last.
    """
    from mmengine.config import Config

    cfg = Config.fromfile(config_file)
    root = data['data_root'] + os.sep
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = root
    for evaluator in ('val_evaluator', 'test_evaluator'):
        # Without a test split, runner.test() scores the val split too.
        cfg[evaluator].ann_file = data['val_ann']
        cfg[evaluator].outfile_prefix = osp.join(work_dir, 'val_predictions')
    if data.get('test_ann') and getattr(args, 'eval_split', 'test') == 'test':
        cfg.test_dataloader = copy.deepcopy(cfg.val_dataloader)
        cfg.test_dataloader.dataset.ann_file = osp.relpath(
            data['test_ann'], data['data_root']
        )
        cfg.test_dataloader.dataset.data_prefix = dict(img='test/')
        cfg.test_evaluator = copy.deepcopy(cfg.val_evaluator)
        cfg.test_evaluator.ann_file = data['test_ann']
        cfg.test_evaluator.outfile_prefix = osp.join(
            work_dir, 'test_predictions'
        )
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
    if pretrained is not None:
        set_pretrained(cfg, pretrained)
    iters = args.iters or cfg.train_cfg.max_iters
    set_schedule(cfg, iters)
    cfg.work_dir = work_dir
    cfg.randomness = dict(seed=args.seed if seed is None else seed)
    # Runners in one process need distinct logger/visualizer names.
    cfg.experiment_name = (
        f'{name.replace(" + ", "_").replace(" ", "_")}_'
        f'{time.strftime("%Y%m%d_%H%M%S")}'
    )
    if iters < 50:
        cfg.default_hooks.logger.interval = 1
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def set_pretrained(cfg, checkpoint: str) -> None:
    """Start backbone and FPN from ``checkpoint`` (mmengine ``init_cfg``).

    The FPN is ``model.neck`` of the baseline and ``model.neck[0]`` of the
    DyHead model (a list neck); both read the checkpoint's ``neck.*`` keys.
    BatchNorm statistics come from the pre-training and stay fixed
    (``norm_eval``), as mmdet does with ImageNet weights.
    """
    cfg.model.backbone.init_cfg = dict(
        type='Pretrained', checkpoint=checkpoint, prefix='backbone.'
    )
    cfg.model.backbone.norm_eval = True
    neck = cfg.model.neck
    fpn = neck[0] if isinstance(neck, (list, tuple)) else neck
    assert fpn.type == 'FPN', f'expected an FPN first, got {fpn.type}'
    fpn.init_cfg = dict(
        type='Pretrained', checkpoint=checkpoint, prefix='neck.'
    )


def set_schedule(cfg, iters: int) -> None:
    """Warm-up (a tenth, at most 100 iterations) then cosine decay to the
    config's floor over ``iters``; one checkpoint at the end."""
    warmup = max(1, min(100, iters // 10))
    # The config's cosine floor, if it has one.
    eta_min = next(
        (
            s['eta_min']
            for s in cfg.get('param_scheduler', [])
            if s.get('type') == 'CosineAnnealingLR' and 'eta_min' in s
        ),
        cfg.optim_wrapper.optimizer.lr * 0.01,
    )
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
            eta_min=eta_min,
        ),
    ]
    cfg.default_hooks.checkpoint.interval = iters


def evaluation_hook(progress=None, tag: str = '', interval: int = 100):
    """A hook that times the val and test iterations and keeps the metrics.

    With ``progress`` (a text stream) it also writes one line every
    ``interval`` training iterations there: the runs' own logs go to files
    when several run at once.
    """
    from mmengine.hooks import Hook

    class EvaluationRecorder(Hook):
        priority = 'VERY_LOW'

        def __init__(self):
            self.times: Dict[str, List[float]] = dict(val=[], test=[])
            self.images = dict(val=0, test=0)
            self.metrics: Dict[str, Optional[dict]] = dict(val=None, test=None)
            self.eval_s = 0.0
            self._start = self._epoch_start = 0.0
            self._train_start = None

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            if self._train_start is None:
                self._train_start = time.perf_counter()

        def after_train_iter(
            self, runner, batch_idx, data_batch=None, outputs=None
        ):
            it = runner.iter + 1
            if progress is None or (it % interval and it != runner.max_iters):
                return
            loss = float((outputs or {}).get('loss', float('nan')))
            progress.write(
                f'  [{tag}] iter {it}/{runner.max_iters}, loss {loss:.3f}, '
                f'{time.perf_counter() - self._train_start:.0f} s\n'
            )
            progress.flush()

        def _mark_epoch(self):
            self._epoch_start = time.perf_counter()

        def _mark_iter(self):
            self._start = time.perf_counter()

        def _record_iter(self, mode, outputs):
            self.times[mode].append(time.perf_counter() - self._start)
            self.images[mode] += len(outputs)

        def _record_epoch(self, mode, metrics):
            self.metrics[mode] = dict(metrics or {})
            self.eval_s += time.perf_counter() - self._epoch_start

        def before_val_epoch(self, runner):
            self._mark_epoch()

        def before_test_epoch(self, runner):
            self._mark_epoch()

        def before_val_iter(self, runner, batch_idx, data_batch=None):
            self._mark_iter()

        def before_test_iter(self, runner, batch_idx, data_batch=None):
            self._mark_iter()

        def after_val_iter(
            self, runner, batch_idx, data_batch=None, outputs=None
        ):
            self._record_iter('val', outputs)

        def after_test_iter(
            self, runner, batch_idx, data_batch=None, outputs=None
        ):
            self._record_iter('test', outputs)

        def after_val_epoch(self, runner, metrics=None):
            self._record_epoch('val', metrics)

        def after_test_epoch(self, runner, metrics=None):
            self._record_epoch('test', metrics)

        def ms_per_image(self, mode: str = 'val') -> float:
            # The first iterations pay for lazy allocations; skip them.
            times = self.times[mode]
            skip = min(3, len(times) - 1)
            timed = times[skip:]
            per_iter = self.images[mode] / max(1, len(times))
            return 1000 * sum(timed) / max(1, len(timed)) / per_iter

    return EvaluationRecorder()


def metrics_row(metrics: dict) -> dict:
    """COCO APs in % from CocoMetric's ``coco/bbox_*`` keys."""
    row = {}
    for label, key in METRICS:
        # CocoMetric returns no keys when a model predicted no box at all
        # (e.g. after a few iterations): that is an AP of 0. It reports -1
        # for a size bucket without ground truth: no AP (None, 'n/a').
        value = float(metrics.get(f'coco/{key}', 0.0))
        row[label] = None if value < 0 else 100 * value
    return row


def octave_ap(ann_file: str, dets_file: str) -> Dict[str, Optional[float]]:
    """COCO AP (%) of the detections in each size octave of ``OCTAVES``.

    pycocotools' own evaluation with its area ranges replaced by the
    octaves (a ground-truth box outside the range is ignored, as COCO does
    for APs/APm/APl). None for an octave without ground truth.
    """
    import contextlib
    import io

    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with open(dets_file) as f:
        dets = json.load(f)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_file)
        if not dets:
            return {name: 0.0 for name, _, _ in OCTAVES}
        ev = COCOeval(gt, gt.loadRes(dets), 'bbox')
        ev.params.areaRng = [[lo**2, hi**2] for _, lo, hi in OCTAVES]
        ev.params.areaRngLbl = [name for name, _, _ in OCTAVES]
        ev.evaluate()
        ev.accumulate()
    # precision: (IoU thresholds, recall points, classes, area ranges,
    # max-detection settings); the last setting is 100 detections.
    precision = ev.eval['precision']
    out = {}
    for a, (name, _, _) in enumerate(OCTAVES):
        p = precision[:, :, :, a, -1]
        p = p[p > -1]
        out[name] = float(100 * np.mean(p)) if p.size else None
    return out


def train_and_evaluate(name: str, cfg, progress=None, tag: str = '') -> dict:
    """Train with Runner.from_cfg and evaluate with mmdet's CocoMetric.

    The loop's final validation scores the val split; when the config has a
    test split, ``runner.test()`` then scores it. The row's AP columns are
    the test split's if there is one (``val`` holds the val split's), else
    the val split's.
    """
    from mmengine.runner import Runner

    print(
        f'\n=== {name}: training {cfg.train_cfg.max_iters} iterations, '
        f'then evaluating; logs in {cfg.work_dir} ===',
        flush=True,
    )
    runner = Runner.from_cfg(cfg)
    recorder = evaluation_hook(progress, tag or name)
    runner.register_hook(recorder)
    start = time.perf_counter()
    runner.train()
    if recorder.metrics['val'] is None:
        raise RuntimeError(
            f'{name}: the training loop did not validate; '
            'train_cfg.val_interval must divide max_iters.'
        )
    has_test = cfg.test_evaluator.ann_file != cfg.val_evaluator.ann_file
    if has_test:
        runner.test()
    total_s = time.perf_counter() - start
    mode = 'test' if has_test else 'val'
    row = dict(
        model=name,
        train_s=total_s - recorder.eval_s,
        ms_per_img=recorder.ms_per_image(mode),
        params_m=sum(p.numel() for p in runner.model.parameters()) / 1e6,
        split=mode,
        val=metrics_row(recorder.metrics['val']),
    )
    row.update(metrics_row(recorder.metrics[mode]))
    evaluator = cfg.test_evaluator if has_test else cfg.val_evaluator
    dets = f'{evaluator.outfile_prefix}.bbox.json'
    if osp.isfile(dets):
        row['octaves'] = octave_ap(evaluator.ann_file, dets)
    return row


def run_job(job: dict) -> dict:
    """One training in a fresh process (see :func:`run_jobs`).

    Its log goes to ``<work_dir>/run.log``; one progress line every 100
    iterations goes to the parent's output.
    """
    import torch

    torch.set_num_threads(job['threads'])
    os.makedirs(job['cfg'].work_dir, exist_ok=True)
    # fd-level, so that C++ warnings land in the log as well.
    progress = os.fdopen(os.dup(1), 'w')
    log = open(osp.join(job['cfg'].work_dir, 'run.log'), 'a')
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    import mmdet_dyhead  # noqa: F401  (registers DyHeadNeck)

    progress.write(f'started: {job["tag"]}\n')
    progress.flush()
    try:
        row = train_and_evaluate(job['name'], job['cfg'], progress, job['tag'])
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [''])[0][:300]
        raise RuntimeError(
            f'{job["tag"]} failed: {type(err).__name__}: {first_line}; '
            'its log: '
            f'{osp.join(job["cfg"].work_dir, "run.log")}'
        ) from err
    row.update(job['record'])
    return row


def run_jobs(jobs: List[dict], workers: int) -> List[dict]:
    """Run :func:`run_job` for every job, ``workers`` processes at a time.

    Each job gets its own (spawned) process, so runs share no state and one
    thread per process keeps the cores busy without oversubscribing them.
    Rows come back in the order of ``jobs``.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = multiprocessing.get_context('spawn')
    rows: List[Optional[dict]] = [None] * len(jobs)
    with ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)),
        mp_context=ctx,
        max_tasks_per_child=1,
    ) as pool:
        futures = {}
        for k, job in enumerate(jobs):
            futures[pool.submit(run_job, job)] = k
        for future in as_completed(futures):
            k = futures[future]
            row = future.result()
            rows[k] = row
            val = (
                f' (val AP {row["val"]["AP"]:.1f})'
                if row['split'] != 'val'
                else ''
            )
            print(
                f'finished: {jobs[k]["tag"]}: {row["split"]} AP '
                f'{row["AP"]:.1f}{val}, '
                f'{row["train_s"] / 60:.1f} min; log: '
                f'{osp.join(jobs[k]["cfg"].work_dir, "run.log")}',
                flush=True,
            )
    return rows


def make_job(name, cfg, tag, threads, record=None):
    return dict(
        name=name,
        cfg=cfg,
        tag=tag,
        threads=threads,
        record=dict(record or {}),
    )


def pretrain(args, data: Dict[str, str], out_dir: str) -> str:
    """Pre-train backbone + FPN once; return the cached weights' path.

    The weights are reused while the data, the pre-training config and the
    options that shape them are unchanged (``pretrain/pretrain.json``).
    """
    import torch

    from projects.synthetic_coco import read_synthetic_meta

    work_dir = osp.join(out_dir, 'pretrain')
    weights = osp.join(work_dir, PRETRAINED_FILE)
    config_file = PRETRAIN_CONFIG
    cfg = build_cfg(
        config_file,
        'pretrain',
        data,
        work_dir,
        argparse.Namespace(
            image_size=args.image_size,
            batch_size=args.batch_size,
            iters=args.pretrain_iters,
            quick=args.quick,
            seed=args.data_seed,
            # The test split is for the final table only.
            eval_split='val',
        ),
    )
    # The whole resolved config (its bases included), without the names
    # that change from run to run.
    resolved = {
        k: v
        for k, v in cfg.to_dict().items()
        if k not in ('experiment_name', 'work_dir')
    }
    record = dict(
        config=json.loads(json.dumps(resolved, default=str)),
        data=read_synthetic_meta(data['data_root']),
        iters=cfg.train_cfg.max_iters,
        batch_size=cfg.train_dataloader.batch_size,
        seed=args.data_seed,
    )
    record_file = osp.join(work_dir, 'pretrain.json')
    if osp.isfile(weights) and osp.isfile(record_file):
        with open(record_file) as f:
            if json.load(f) == record:
                print(f'pre-trained backbone + FPN: reusing {weights}')
                return weights
    print(
        f'pre-training backbone + FPN with a RetinaNet head '
        f'({cfg.train_cfg.max_iters} iterations; log: '
        f'{osp.join(work_dir, "run.log")})',
        flush=True,
    )
    # Alone on the machine: it may use every worker's core.
    (row,) = run_jobs(
        [
            make_job(
                'Pre-training',
                cfg,
                'pre-training',
                args.threads * args.workers,
            )
        ],
        1,
    )
    ckpt = torch.load(
        osp.join(work_dir, f'iter_{cfg.train_cfg.max_iters}.pth'),
        map_location='cpu',
        weights_only=False,
    )
    state = {
        k: v
        for k, v in ckpt['state_dict'].items()
        if k.startswith(('backbone.', 'neck.'))
    }
    torch.save(
        dict(
            state_dict=state,
            meta=dict(source=cfg.filename, pretrain_val=metrics_row_str(row)),
        ),
        weights,
    )
    with open(record_file, 'w') as f:
        json.dump(record, f, indent=1)
    return weights


def metrics_row_str(row: dict) -> str:
    return ', '.join(
        f'{m} {row[m]:.1f}' for m, _ in METRICS if row[m] is not None
    )


def summarize(rows: List[dict]) -> List[dict]:
    """Mean and standard deviation over seeds, one summary per model."""
    models = []
    for r in rows:
        if r['model'] not in models:
            models.append(r['model'])
    out = []
    for name in models:
        runs = [r for r in rows if r['model'] == name]
        s = dict(model=name, n=len(runs), seeds=[r['seed'] for r in runs])
        for label, _ in METRICS + [('val_AP', None)]:
            vals = [
                r['val']['AP'] if label == 'val_AP' else r[label] for r in runs
            ]
            vals = [v for v in vals if v is not None]
            if not vals:
                s[label] = s[label + '_std'] = None
                continue
            mean = sum(vals) / len(vals)
            s[label] = mean
            s[label + '_std'] = (
                math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
                if len(vals) > 1
                else 0.0
            )
        for key in ('train_s', 'ms_per_img', 'params_m'):
            s[key] = sum(r[key] for r in runs) / len(runs)
        out.append(s)
    return out


def mean_std_cell(s: dict, key: str) -> str:
    """A table cell of :func:`summarize`'s ``s``: 'mean ± std', the mean
    alone for one seed, 'n/a' without a value."""
    if s[key] is None:
        return 'n/a'
    if s['n'] < 2:
        return f'{s[key]:.1f}'
    return f'{s[key]:.1f} ± {s[key + "_std"]:.1f}'


def format_table(summary: List[dict], with_val: bool = True) -> str:
    """Markdown: AP mean ± std over seeds, time and speed per model;
    ``with_val`` adds the val split's AP (when the APs are the test's)."""
    head = (
        ['Model']
        + [m for m, _ in METRICS]
        + (['val AP'] if with_val else [])
        + ['Params (M)', 'Train time', 'Inference (ms/img)']
    )
    lines = [
        '| ' + ' | '.join(head) + ' |',
        '|' + '|'.join(['---'] + ['---:'] * (len(head) - 1)) + '|',
    ]

    for s in summary:
        cells = (
            [s['model']]
            + [mean_std_cell(s, m) for m, _ in METRICS]
            + ([mean_std_cell(s, 'val_AP')] if with_val else [])
            + [
                f'{s["params_m"]:.2f}',
                f'{s["train_s"] / 60:.1f} min',
                f'{s["ms_per_img"]:.1f}',
            ]
        )
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def format_seed_table(rows: List[dict]) -> str:
    """Markdown: the AP of every run (and its val AP if that is another
    split)."""
    seeds = sorted({r['seed'] for r in rows})
    models = list(dict.fromkeys(r['model'] for r in rows))
    lines = [
        '| Model | ' + ' | '.join(f'seed {s}' for s in seeds) + ' |',
        '|---|' + '---:|' * len(seeds),
    ]
    for name in models:
        by_seed = {r['seed']: r for r in rows if r['model'] == name}
        cells = [
            '-'
            if s not in by_seed
            else f'{by_seed[s]["AP"]:.1f}'
            if by_seed[s]['split'] == 'val'
            else f'{by_seed[s]["AP"]:.1f} (val {by_seed[s]["val"]["AP"]:.1f})'
            for s in seeds
        ]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def format_octave_table(rows: List[dict]) -> str:
    """Markdown: AP per object-size octave, mean over seeds per model."""
    models = list(dict.fromkeys(r['model'] for r in rows))
    names = [name for name, _, _ in OCTAVES]
    lines = [
        '| Model | ' + ' | '.join(f'AP {n} px' for n in names) + ' |',
        '|---|' + '---:|' * len(names),
    ]
    for model in models:
        runs = [r for r in rows if r['model'] == model and 'octaves' in r]
        cells = []
        for n in names:
            vals = [r['octaves'][n] for r in runs]
            vals = [v for v in vals if v is not None]
            cells.append(f'{sum(vals) / len(vals):.1f}' if vals else 'n/a')
        lines.append(f'| {model} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def plot(
    summary: List[dict], rows: List[dict], path: str, split: str = 'test'
) -> None:
    """Grouped bars of the six APs (mean over seeds, std as error bars),
    one colour per model; each seed's value as a dot."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    labels = [m for m, _ in METRICS]
    width = 0.8 / len(summary)
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for i, s in enumerate(summary):
        xs = [
            k + (i - (len(summary) - 1) / 2) * width
            for k in range(len(labels))
        ]
        bars = ax.bar(
            xs,
            [s[m] or 0.0 for m in labels],
            width,
            yerr=[s[m + '_std'] or 0.0 for m in labels],
            capsize=2,
            label=f'{s["model"]} ({s["ms_per_img"]:.0f} ms/img)',
        )
        ax.bar_label(bars, fmt='%.1f', fontsize=7, label_type='center')
        for r in rows:
            if r['model'] == s['model']:
                ax.plot(
                    xs,
                    [r[m] or 0.0 for m in labels],
                    '.',
                    color='black',
                    markersize=3,
                )
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel('COCO AP (%)')
    n = summary[0]['n'] if summary else 0
    ax.set_title(
        f'Synthetic shapes, {split} split (mmdet CocoMetric), '
        f'mean ± std of {n} seed{"s" if n != 1 else ""}'
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> List[dict]:
    args = parse_args(argv)
    total_start = time.perf_counter()
    out_dir = osp.abspath(args.out_dir)
    prepare_out_dir(out_dir, args.overwrite, vars(args))
    data = prepare_data(args, out_dir)
    pretrained = pretrain(args, data, out_dir)

    run_dir = osp.join(out_dir, args.run_name) if args.run_name else out_dir
    jobs = []
    # The DyHead runs take longest: started first, the shorter ones fill
    # the other workers' gaps (longest-first scheduling). The table keeps
    # the --models order.
    order = sorted(args.models, key=lambda n: n != 'ATSS + DyHead')
    for name in order:
        for seed in args.seeds:
            stem = osp.splitext(MODELS[name])[0]
            work_dir = osp.join(run_dir, stem, f'seed{seed}')
            cfg = build_cfg(
                osp.join(config_dir(), MODELS[name]),
                name,
                data,
                work_dir,
                args,
                seed=seed,
                pretrained=pretrained,
                cfg_options=args.cfg_options,
            )
            jobs.append(
                make_job(
                    name,
                    cfg,
                    f'{name}, seed {seed}',
                    args.threads,
                    dict(seed=seed),
                )
            )
    print(
        f'training {len(jobs)} detectors, {args.workers} at a time',
        flush=True,
    )
    rows = run_jobs(jobs, args.workers)
    rows.sort(key=lambda r: (args.models.index(r['model']), r['seed']))

    summary = summarize(rows)
    split = rows[0]['split'] if rows else args.eval_split
    table = format_table(summary, with_val=split != 'val')
    seeds = format_seed_table(rows)
    octaves = format_octave_table(rows)
    total_s = time.perf_counter() - total_start
    title = f'{split.capitalize()} split, mean ± std over seeds {args.seeds}'
    each = f'Every run ({split} AP' + (
        ', val AP in brackets)' if split != 'val' else ')'
    )
    with open(osp.join(run_dir, 'results.md'), 'w') as f:
        f.write(
            f'{title}:\n\n{table}\n\n{each}:\n\n{seeds}\n\n'
            f'{OCTAVE_TITLE}:\n\n{octaves}\n\n'
            f'Total wall time: {total_s / 60:.1f} min\n'
        )
    with open(osp.join(run_dir, 'results.json'), 'w') as f:
        json.dump(
            dict(
                summary=summary,
                rows=rows,
                total_s=total_s,
                args=vars(args),
            ),
            f,
            indent=1,
        )
    plot(summary, rows, osp.join(run_dir, 'results.png'), split)
    print(f'\n{title}:\n\n{table}')
    print(f'\n{each}:\n\n{seeds}')
    print(f'\n{OCTAVE_TITLE}:\n\n{octaves}')
    print(
        f'\nTotal wall time {total_s / 60:.1f} min. Table: '
        f'{osp.join(run_dir, "results.md")}, chart: '
        f'{osp.join(run_dir, "results.png")}'
    )
    return rows


if __name__ == '__main__':
    main()
