"""Table 1 of the DyHead paper on the synthetic shapes data (long; not in CI).

Trains the quickstart's ATSS baseline and ATSS + DyHead with each
combination of scale- (L), spatial- (S) and task-aware (C) attention switched
on or off (``DyHeadNeck(use_scale_attn, use_spatial_attn, use_task_attn)``)
under the quickstart's protocol: every model starts from the same cached
pre-trained backbone + FPN, trains once per seed, and is scored on the val
split with mmdet's CocoMetric. The table (mean and spread over the seeds),
the data, the runs and results.json go to --out-dir (work_dirs/
study_ablation/ unless told); --doc writes the table elsewhere.

Example:
    python projects/ab_study/study_ablation.py                 # 6 rows
    python projects/ab_study/study_ablation.py --all --seeds 0  # all 8
    python projects/ab_study/study_ablation.py --doc docs/ablation_synthetic.md
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

# Run from a checkout: the repository root holds mmdet_dyhead and projects/.
ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from projects.ab_study import ab_study as quickstart  # noqa: E402

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
        '--seeds',
        type=int,
        nargs='+',
        default=[0, 1],
        help='one training of every row per seed (default: %(default)s)',
    )
    parser.add_argument(
        '--workers',
        type=int,
        default=2,
        help='trainings at once, one process each (default: %(default)s)',
    )
    parser.add_argument(
        '--threads',
        type=int,
        default=1,
        metavar='N',
        help='torch CPU threads per process (default: %(default)s)',
    )
    args = parser.parse_args(argv)
    for key in (
        'iters',
        'num_blocks',
        'num_train',
        'num_val',
        'workers',
        'threads',
    ):
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


def format_doc(summary, rows, args, total_s, qs, command=None) -> str:
    """The markdown page from :func:`quickstart.summarize`'s ``summary``
    (one entry per row, with ``row``, ``iters``, ``batch_size`` and
    ``num_blocks`` added); ``command``: the command line it came from
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

    for s in summary:
        flags = (
            ['–'] * 3
            if s['row'] == 'baseline'
            else ['✓' if on else '✗' for on in s['row']]
        )
        paper = PAPER_AP.get(
            s['row'] if s['row'] == 'baseline' else tuple(s['row'])
        )
        cells = (
            flags
            + [qs.mean_std_cell(s, m) for m in metric_names]
            + [
                f'{s["params_m"]:.2f}',
                f'{s["train_s"] / 60:.1f} min',
                f'{s["ms_per_img"]:.1f}',
                '' if paper is None else f'{paper}',
            ]
        )
        lines.append('| ' + ' | '.join(cells) + ' |')
    cmd = command or shlex.join(
        ['python', 'projects/ab_study/study_ablation.py'] + sys.argv[1:]
    )
    blocks = [s['num_blocks'] for s in summary if s['num_blocks']]
    return '\n'.join(
        [
            '# Table 1 ablation on the synthetic shapes data',
            '',
            'Each attention of the DyHead block switched on (✓) or off (✗), '
            "as in Table 1 of the paper, under the quickstart's protocol "
            '(docs/ab_study.md): ResNet-18 at 1/4 width and FPN 64 '
            'channels pre-trained once and shared, fresh heads. "–" is the '
            'ATSS baseline without DyHead (4 + 4 stacked convs in the head). '
            'With every attention off a DyHead block still averages plain '
            '3x3 convolutions over neighbouring levels.',
            '',
            "AP columns are mmdet's CocoMetric (%) on the synthetic val "
            f'split, mean ± standard deviation over seeds {args.seeds}; '
            '"Paper AP" is the COCO val AP of the same row in the paper '
            '(ATSS R-50 1x, six blocks), for orientation only: the data, '
            'backbone, schedule and block count differ.',
            '',
            '\n'.join(lines),
            '',
            f'AP per object-size octave, {qs.OCTAVE_TITLE[3:]}:',
            '',
            qs.format_octave_table(rows),
            '',
            f'- Command: `{cmd}`',
            f'- Training: {summary[0]["iters"]} iterations per model, batch '
            f'{summary[0]["batch_size"]}, {args.num_train} train / '
            f'{args.num_val} val images, '
            f'{max(blocks) if blocks else 0} DyHead blocks.',
            f'- Machine: {platform.processor() or platform.machine()}, '
            f'{os.cpu_count()} CPU cores, {args.workers} runs at once with '
            f'{args.threads} torch thread(s) each; total wall time '
            f'{total_s / 60:.1f} min ({time.strftime("%Y-%m-%d")}).',
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
    seed=None,
    pretrained=None,
):
    """The quickstart config of one Table 1 row.

    Args:
        qs: the :mod:`projects.ab_study.ab_study` module.
        row: ``'baseline'`` or an (L, S, C) tuple of 0/1 switches.
        base_file, dy_file (str): the quickstart's two config files.
        data (dict): paths returned by ``generate_synthetic_coco``.
        work_dir (str): the run's work_dir.
        qs_args (argparse.Namespace): options read by ``qs.build_cfg``.
        num_blocks (int, optional): DyHead blocks, if not the config's.
        seed (int, optional), pretrained (str, optional): as in
            ``qs.build_cfg``.
    """
    cfg = qs.build_cfg(
        base_file if row == 'baseline' else dy_file,
        row_name(row),
        data,
        work_dir,
        qs_args,
        seed=seed,
        pretrained=pretrained,
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
    command = shlex.join(
        ['python', 'projects/ab_study/study_ablation.py'] + argv
    )
    qs = quickstart
    start = time.perf_counter()
    out_dir = osp.abspath(args.out_dir)
    qs.prepare_out_dir(out_dir, args.overwrite, dict(vars(args), study=True))
    # The quickstart's options that its data, pre-training and build_cfg
    # read; the study scores the val split (no test split is drawn).
    qs_args = argparse.Namespace(
        image_size=None,
        batch_size=None,
        iters=args.iters,
        pretrain_iters=None,
        num_train=args.num_train,
        num_val=args.num_val,
        num_test=0,
        data_seed=0,
        seed=0,
        quick=False,
        workers=args.workers,
        threads=args.threads,
        eval_split='val',
    )
    data = qs.prepare_data(qs_args, out_dir)
    pretrained = qs.pretrain(qs_args, data, out_dir)

    cfg_dir = qs.config_dir()
    base_file = osp.join(cfg_dir, qs.MODELS['ATSS'])
    dy_file = osp.join(cfg_dir, qs.MODELS['ATSS + DyHead'])
    variants = (
        PAPER_ROWS
        if not args.all
        else ['baseline'] + list(itertools.product((0, 1), repeat=3))
    )
    jobs = []
    for seed in args.seeds:
        for row in variants:
            name = row_name(row)
            tag = (
                'baseline'
                if row == 'baseline'
                else 'lsc' + ''.join(map(str, row))
            )
            cfg = variant_cfg(
                qs,
                row,
                base_file,
                dy_file,
                data,
                osp.join(out_dir, tag, f'seed{seed}'),
                qs_args,
                args.num_blocks,
                seed=seed,
                pretrained=pretrained,
            )
            record = dict(
                seed=seed,
                row=row,
                iters=cfg.train_cfg.max_iters,
                batch_size=cfg.train_dataloader.batch_size,
                num_blocks=(
                    None if row == 'baseline' else cfg.model.neck[1].num_blocks
                ),
            )
            jobs.append(
                qs.make_job(
                    name, cfg, f'{name}, seed {seed}', args.threads, record
                )
            )
    rows = qs.run_jobs(jobs, args.workers)
    summary = qs.summarize(rows)
    for s in summary:
        first = next(r for r in rows if r['model'] == s['model'])
        s.update({k: first[k] for k in ('row', 'iters', 'batch_size')})
        s['num_blocks'] = first['num_blocks']
    with open(osp.join(out_dir, 'results.json'), 'w') as f:
        json.dump(dict(summary=summary, rows=rows), f, indent=1)
    total_s = time.perf_counter() - start
    doc = format_doc(summary, rows, args, total_s, qs, command)
    doc_file = args.doc or osp.join(out_dir, 'ablation_synthetic.md')
    os.makedirs(osp.dirname(osp.abspath(doc_file)), exist_ok=True)
    with open(doc_file, 'w') as f:
        f.write(doc)
    print('\n' + doc)
    print(f'written to {doc_file}')
    return summary


if __name__ == '__main__':
    main()
