"""The quickstart: one ATSS + DyHead detector from data to deployment, on CPU.

Runs the commands a user runs on their own detector, each printed before it
runs, on the built-in synthetic shapes data:

1. ``projects/synthetic_coco/generate.py``: the data (train and val splits)
   in ``data/synthetic_coco/``, where the quickstart config reads it (kept
   for later runs);
2. ``tools/train.py``: trains ``configs/quickstart/`` ATSS + DyHead
   (mmengine's log lines show progress);
3. ``tools/test.py``: COCO AP of the checkpoint on the val split
   (pycocotools' table);
4. ``tools/export_onnx.py``: the ONNX file, checked against PyTorch in
   onnxruntime;
5. ``tools/image_demo.py``: pictures of the detections on a few val images;
6. ``tools/visualize_attention.py``: the attention plots (paper Figures 3
   and 4) on the same images;

then prints where everything is. ``make quickstart`` runs it after the
install. The fair comparison with the ATSS baseline is another command:
``python projects/ab_study/ab_study.py`` (docs/ab_study.md).

Example:
    python scripts/quickstart.py                 # the full run (minutes)
    python scripts/quickstart.py --quick         # every stage in seconds
"""

import argparse
import glob
import os
import os.path as osp
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import List, Optional

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(
    'configs', 'quickstart', 'atss_r18-tiny_fpn_dyhead-2b_synthetic.py'
)
# Where the config reads its data (its ``data_root``).
DATA_ROOT = osp.join('data', 'synthetic_coco')
NUM_PICTURES = 4
# --quick: every stage runs, nothing is learned.
QUICK = dict(num_train=8, num_val=4, iters=2)
# The lines of pycocotools' summary (COCOeval.summarize) in the test log.
COCO_LINE = re.compile(r'Average (Precision|Recall)\s+\(A[PR]\) @\[.*\] = ')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        '--out-dir',
        default=osp.join('work_dirs', 'quickstart'),
        help='checkpoint, logs, AP table, ONNX file and pictures go here',
    )
    parser.add_argument(
        '--quick',
        action='store_true',
        help=f'smoke test: {QUICK}, data in <out-dir>/data, every box '
        'kept (score_thr 0) so that the AP table has predictions to score',
    )
    return parser.parse_args(argv)


def run(stage: str, cmd: List[str], log_file: Optional[str] = None) -> str:
    """Run one stage's command from the repository root, its output shown
    as it comes (and kept in ``log_file``); returns the output."""
    print(f'\n[quickstart] {stage}\n$ {shlex.join(cmd)}', flush=True)
    start = time.time()
    proc = subprocess.Popen(
        [sys.executable] + cmd[1:],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    proc.wait()
    output = ''.join(lines)
    if log_file:
        with open(log_file, 'w') as f:
            f.write(output)
    if proc.returncode != 0:
        raise SystemExit(
            f'[quickstart] {stage} failed (exit {proc.returncode}); the '
            f'command and its output are above.'
        )
    print(f'[quickstart] {stage}: done in {time.time() - start:.0f} s')
    return output


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    out = args.out_dir
    os.makedirs(osp.join(ROOT, out), exist_ok=True)
    data_root = osp.join(out, 'data') if args.quick else DATA_ROOT
    begin = time.time()

    gen = ['python', 'projects/synthetic_coco/generate.py', data_root]
    if args.quick:
        gen += [
            '--num-train',
            str(QUICK['num_train']),
            '--num-val',
            str(QUICK['num_val']),
        ]
    run('1/6 data', gen + ['--reuse', '--overwrite'])

    options = []
    if args.quick:
        root = data_root.rstrip('/') + '/'
        ann = root + 'annotations/instances_val.json'
        it = QUICK['iters']
        options = [
            f'train_dataloader.dataset.data_root={root}',
            f'val_dataloader.dataset.data_root={root}',
            f'test_dataloader.dataset.data_root={root}',
            f'val_evaluator.ann_file={ann}',
            f'test_evaluator.ann_file={ann}',
            f'train_cfg.max_iters={it}',
            f'train_cfg.val_interval={it}',
            f'default_hooks.checkpoint.interval={it}',
            'default_hooks.logger.interval=1',
            'model.test_cfg.score_thr=0.0',
        ]
    cfg_options = ['--cfg-options'] + options if options else []

    train_dir = osp.join(out, 'train')
    run(
        '2/6 train',
        ['python', 'tools/train.py', CONFIG, '--work-dir', train_dir]
        + cfg_options,
    )
    with open(osp.join(ROOT, train_dir, 'last_checkpoint')) as f:
        checkpoint = f.read().strip()  # absolute: mmengine writes it so
    if checkpoint.startswith(ROOT + os.sep):
        checkpoint = osp.relpath(checkpoint, ROOT)

    test_dir = osp.join(out, 'test')
    predictions = osp.join(test_dir, 'predictions.pkl')
    test_log = run(
        '3/6 test (COCO AP on the val split)',
        [
            'python',
            'tools/test.py',
            CONFIG,
            checkpoint,
            '--work-dir',
            test_dir,
            '--out',
            predictions,
        ]
        + cfg_options,
    )
    ap_lines = [line.strip() for line in test_log.splitlines()]
    ap_lines = [line for line in ap_lines if COCO_LINE.search(line)]
    ap_file = osp.join(out, 'coco_ap.txt')
    with open(osp.join(ROOT, ap_file), 'w') as f:
        f.write('\n'.join(ap_lines) + '\n')

    # A few val images for the pictures, in a folder of their own.
    val_dir = osp.join(ROOT, data_root, 'val')
    picked = sorted(glob.glob(osp.join(val_dir, '*.png')))[:NUM_PICTURES]
    image_dir = osp.join(out, 'images')
    os.makedirs(osp.join(ROOT, image_dir), exist_ok=True)
    for path in picked:
        shutil.copy(path, osp.join(ROOT, image_dir))

    onnx_file = osp.join(out, 'atss_r18-tiny_fpn_dyhead-2b.onnx')
    run(
        '4/6 export to ONNX (checked against PyTorch in onnxruntime)',
        [
            'python',
            'tools/export_onnx.py',
            CONFIG,
            checkpoint,
            '--out',
            onnx_file,
            '--image',
            osp.join(image_dir, osp.basename(picked[0])),
        ]
        + cfg_options,
    )
    det_dir = osp.join(out, 'detections')
    run(
        '5/6 detections on a few val images',
        [
            'python',
            'tools/image_demo.py',
            image_dir,
            CONFIG,
            '--weights',
            checkpoint,
            '--out-dir',
            det_dir,
            # A small model on a small task: its boxes score lower than
            # the demo's 0.3 default.
            '--pred-score-thr',
            '0.2',
        ],
    )
    attn_dir = osp.join(out, 'attention')
    run(
        '6/6 attention plots (paper Figures 3 and 4)',
        [
            'python',
            'tools/visualize_attention.py',
            CONFIG,
            checkpoint,
            '--images',
            image_dir,
            '--out-dir',
            attn_dir,
        ]
        + cfg_options,
    )

    results = dict(
        checkpoint=checkpoint,
        training_log=train_dir,
        coco_ap=ap_file,
        predictions=predictions,
        onnx=onnx_file,
        detections=osp.join(det_dir, 'vis'),
        attention=attn_dir,
    )
    minutes = (time.time() - begin) / 60
    print(f'\n[quickstart] finished in {minutes:.1f} min. COCO AP (val):')
    for line in ap_lines[:6]:
        print(f'  {line}')
    print('[quickstart] where everything is:')
    for key, path in results.items():
        print(f'  {key:<13} {path}')
    print(
        '[quickstart] next: docs/user_guide.md (your own configs); the fair '
        'comparison with the ATSS baseline: python '
        'projects/ab_study/ab_study.py (docs/ab_study.md).'
    )
    return results


if __name__ == '__main__':
    main()
