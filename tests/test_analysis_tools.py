"""mmdet's log analysis tools (``mim run mmdet analyze_logs ...``) read the
logs of a training with this package's tools."""

import glob
import os.path as osp
import subprocess
import sys

import pytest

from projects.synthetic_coco import generate_synthetic_coco
from tests.helpers import REPO_ROOT, subprocess_env

CONFIG = osp.join(
    REPO_ROOT,
    'configs',
    'quickstart',
    'atss_r18-tiny_fpn_dyhead-2b_synthetic.py',
)


def _run(args, cwd):
    proc = subprocess.run(
        args,
        cwd=str(cwd),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_analyze_logs_plots_the_loss_and_map_of_a_tiny_training(tmp_path):
    # The quickstart config reads data/synthetic_coco/ under the cwd.
    generate_synthetic_coco(
        str(tmp_path / 'data' / 'synthetic_coco'),
        num_train=2,
        num_val=1,
        image_size=64,
        seed=0,
    )
    work = tmp_path / 'work'
    _run(
        [
            sys.executable,
            osp.join(REPO_ROOT, 'tools', 'train.py'),
            CONFIG,
            '--work-dir',
            str(work),
            '--cfg-options',
            'train_cfg.max_iters=2',
            'train_cfg.val_interval=2',
            'default_hooks.logger.interval=1',
            'train_dataloader.batch_size=2',
            'train_dataloader.dataset.pipeline.2.scale=(64,64)',
            'val_dataloader.dataset.pipeline.1.scale=(64,64)',
            # An untrained model scores every box under mmdet's 0.05; with
            # boxes, the final validation logs coco/bbox_mAP.
            'model.test_cfg.score_thr=0.0',
        ],
        tmp_path,
    )
    (log,) = glob.glob(str(work / '*' / 'vis_data' / 'scalars.json'))

    png = tmp_path / 'curve.png'
    mim = [sys.executable, '-m', 'mim', 'run', 'mmdet', 'analyze_logs']
    out = _run(
        mim
        + ['plot_curve', log, '--keys', 'loss', 'bbox_mAP', '--out', str(png)],
        tmp_path,
    ).stdout
    # analyze_logs imports seaborn, which the install provides.
    assert f'plot curve of {log}, metric is loss' in out
    assert f'plot curve of {log}, metric is bbox_mAP' in out
    assert png.read_bytes().startswith(b'\x89PNG')
