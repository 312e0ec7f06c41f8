"""Table 1 of the DyHead paper on the synthetic shapes data (long; not in CI).

Trains the quickstart's ATSS baseline and ATSS + DyHead with each
combination of scale- (L), spatial- (S) and task-aware (C) attention switched
on or off (``DyHeadNeck(use_scale_attn, use_spatial_attn, use_task_attn)``),
evaluates every model with mmdet's CocoMetric, and writes the table, the
data, the runs and results.json to --out-dir (work_dirs/study_ablation/
unless told); --doc writes the table elsewhere.

Example:
    python tools/study_ablation.py                      # paper's 6 rows
    python tools/study_ablation.py --iters 400 --all    # all 8 combinations
    python tools/study_ablation.py --iters 300 --doc docs/ablation_synthetic.md
"""

import argparse
import itertools
import json
import os
import os.path as osp
import platform
import shlex
import sys
import time

from . import quickstart

# (L, S, C) rows of the paper's Table 1, in its order; 'baseline' is ATSS
# without any DyHead block (stacked convs in the head).
PAPER_ROWS = [
    'baseline',
    (1, 0, 0),
    (0, 1, 0),
    (0, 0, 1),
    (1, 1, 0),
    (1, 1, 1),
]
# Facts from the paper's text (ATSS R-50 1x, COCO val): the baseline's AP and
# the gain of each row over it.
PAPER_AP = {
    'baseline': 39.0,
    (1, 0, 0): 39.9,
    (0, 1, 0): 41.4,
    (0, 0, 1): 40.3,
    (1, 1, 0): 41.9,
    (1, 1, 1): 42.6,
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--out-dir',
        default=osp.join('work_dirs', 'study_ablation'),
        help='data, runs, results.json and (without --doc) the table go '
        'here, relative to the current directory (default: %(default)s)',
    )
    parser.add_argument(
        '--doc',
        default=None,
        metavar='FILE',
        help='markdown file the table is written to (default: '
        'OUT_DIR/ablation_synthetic.md; docs/ablation_synthetic.md is '
        'written with --doc docs/ablation_synthetic.md)',
    )
    parser.add_argument(
        '--overwrite',
        action='store_true',
        help='write into a non-empty --out-dir this study did not make',
    )
    parser.add_argument(
        '--all',
        action='store_true',
        help="all 8 (L, S, C) combinations instead of the paper's rows",
    )
    parser.add_argument(
        '--iters',
        type=int,
        default=None,
        metavar='N',
        help='training iterations per model (default: the quickstart '
        "configs' max_iters)",
    )
    parser.add_argument(
        '--num-blocks',
        type=int,
        default=None,
        metavar='N',
        help="DyHead blocks (default: the quickstart config's)",
    )
    parser.add_argument(
        '--num-train',
        type=int,
        default=400,
        metavar='N',
        help='synthetic training images (default: %(default)s)',
    )
    parser.add_argument(
        '--num-val',
        type=int,
        default=100,
        metavar='N',
        help='synthetic validation images (default: %(default)s)',
    )
    parser.add_argument(
        '--seed',
        type=int,
        default=0,
        help='seed of the data and of every training (default: %(default)s)',
    )
    parser.add_argument(
        '--threads',
        type=int,
        default=1,
        metavar='N',
        help='torch CPU threads (default: %(default)s; see '
        'tools/quickstart.py)',
    )
    args = parser.parse_args(argv)
    for key in ('iters', 'num_blocks', 'num_train', 'num_val', 'threads'):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(
                f'--{key.replace("_", "-")} must be >= 1, got {value}.'
            )
    return args


def row_name(row) -> str:
    if row == 'baseline':
        return 'ATSS baseline'
    parts = [n for n, on in zip('LSC', row) if on]
    return 'DyHead ' + ('+'.join(parts) if parts else '(no attention)')


def format_doc(rows, args, total_s, qs, command=None) -> str:
    """The markdown page; ``command``: the command line it came from
    (default: this process's)."""
    metric_names = [m for m, _ in qs.METRICS]
    head = (
        ['L.', 'S.', 'C.']
        + metric_names
        + ['Params (M)', 'Train time', 'ms/img', 'Paper AP (COCO)']
    )
    lines = [
        '| ' + ' | '.join(head) + ' |',
        '|' + '|'.join([':-:'] * 3 + ['---:'] * (len(head) - 3)) + '|',
    ]
    for r in rows:
        flags = (
            ['–'] * 3
            if r['row'] == 'baseline'
            else ['✓' if on else '✗' for on in r['row']]
        )
        paper = PAPER_AP.get(
            r['row'] if r['row'] == 'baseline' else tuple(r['row'])
        )
        cells = (
            flags
            + ['n/a' if r[m] is None else f'{r[m]:.1f}' for m in metric_names]
            + [
                f'{r["params_m"]:.2f}',
                f'{r["train_s"] / 60:.1f} min',
                f'{r["ms_per_img"]:.1f}',
                '' if paper is None else f'{paper}',
            ]
        )
        lines.append('| ' + ' | '.join(cells) + ' |')
    cmd = command or shlex.join(
        ['python', 'tools/study_ablation.py'] + sys.argv[1:]
    )
    return '\n'.join(
        [
            '# Table 1 ablation on the synthetic shapes data',
            '',
            'Each attention of the DyHead block switched on (✓) or off (✗), '
            "as in Table 1 of the paper, on the quickstart's data and "
            'detectors (configs/quickstart/, ResNet-18 at 1/4 width from '
            'scratch, FPN 64 channels). "–" is the ATSS baseline without '
            'DyHead (four stacked convs in the head). With every attention '
            'off a DyHead block still averages plain 3x3 convolutions over '
            'neighbouring levels.',
            '',
            "AP columns are mmdet's CocoMetric (%) on the synthetic val set; "
            '"Paper AP" is the COCO val AP of the same row in the paper (ATSS '
            'R-50 1x, six blocks), for orientation only: the data, backbone, '
            'schedule and block count differ.',
            '',
            '\n'.join(lines),
            '',
            f'- Command: `{cmd}`',
            f'- Training: {rows[0]["iters"]} iterations per model, batch '
            f'{rows[0]["batch_size"]}, {args.num_train} train / '
            f'{args.num_val} val images, seed {args.seed}, '
            f'{rows[-1]["num_blocks"]} DyHead blocks.',
            f'- Machine: {platform.processor() or platform.machine()}, '
            f'{os.cpu_count()} CPU cores, torch threads '
            f'{args.threads}; total wall time '
            f'{total_s / 60:.1f} min ({time.strftime("%Y-%m-%d")}).',
            '- One seed per row: differences of about one AP point are within '
            'run-to-run noise at this scale.',
            '',
        ]
    )


def variant_cfg(
    qs,
    row,
    base_file: str,
    dy_file: str,
    data: dict,
    work_dir: str,
    qs_args,
    num_blocks=None,
):
    """The quickstart config of one Table 1 row.

    Args:
        qs: the :mod:`mmdet_dyhead.cli.quickstart` module.
        row: ``'baseline'`` or an (L, S, C) tuple of 0/1 switches.
        base_file, dy_file (str): the quickstart's two config files.
        data (dict): paths returned by ``generate_synthetic_coco``.
        work_dir (str): the run's work_dir.
        qs_args (argparse.Namespace): options read by ``qs.build_cfg``.
        num_blocks (int, optional): DyHead blocks, if not the config's.
    """
    cfg = qs.build_cfg(
        base_file if row == 'baseline' else dy_file,
        row_name(row),
        data,
        work_dir,
        qs_args,
    )
    if row != 'baseline':
        dyhead = cfg.model.neck[1]
        (
            dyhead.use_scale_attn,
            dyhead.use_spatial_attn,
            dyhead.use_task_attn,
        ) = (bool(v) for v in row)
        if num_blocks is not None:
            dyhead.num_blocks = num_blocks
    return cfg


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = shlex.join(['python', 'tools/study_ablation.py'] + argv)
    qs = quickstart
    start = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    out_dir = osp.abspath(args.out_dir)
    qs.prepare_out_dir(out_dir, args.overwrite, dict(vars(args), study=True))
    from mmengine.config import Config

    import mmdet_dyhead  # noqa: F401
    from mmdet_dyhead.testing import generate_synthetic_coco

    cfg_dir = qs.config_dir()
    base_file = osp.join(cfg_dir, qs.MODELS['ATSS'])
    dy_file = osp.join(cfg_dir, qs.MODELS['ATSS + DyHead'])
    image_size = Config.fromfile(base_file).image_size
    data = generate_synthetic_coco(
        osp.join(out_dir, 'data'),
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=image_size,
        seed=args.seed,
        overwrite=True,
        reuse=True,
    )

    variants = (
        PAPER_ROWS
        if not args.all
        else ['baseline'] + list(itertools.product((0, 1), repeat=3))
    )
    # build_cfg reads these quickstart options.
    qs_args = argparse.Namespace(
        image_size=None,
        batch_size=None,
        iters=args.iters,
        seed=args.seed,
        quick=False,
    )
    rows = []
    for row in variants:
        name = row_name(row)
        tag = (
            'baseline' if row == 'baseline' else 'lsc' + ''.join(map(str, row))
        )
        cfg = variant_cfg(
            qs,
            row,
            base_file,
            dy_file,
            data,
            osp.join(out_dir, tag),
            qs_args,
            args.num_blocks,
        )
        num_blocks = (
            None if row == 'baseline' else cfg.model.neck[1].num_blocks
        )
        result = qs.train_and_evaluate(name, cfg)
        result.update(
            row=row,
            iters=cfg.train_cfg.max_iters,
            batch_size=cfg.train_dataloader.batch_size,
            num_blocks=num_blocks,
        )
        rows.append(result)
        # Written after every model, so a long study can be read midway.
        with open(osp.join(out_dir, 'results.json'), 'w') as f:
            json.dump(rows, f, indent=1)
        print(qs.format_table(rows), flush=True)
    total_s = time.perf_counter() - start
    doc = format_doc(rows, args, total_s, qs, command)
    doc_file = args.doc or osp.join(out_dir, 'ablation_synthetic.md')
    os.makedirs(osp.dirname(osp.abspath(doc_file)), exist_ok=True)
    with open(doc_file, 'w') as f:
        f.write(doc)
    print('\n' + doc)
    print(f'written to {doc_file}')
