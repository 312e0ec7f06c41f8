"""`make quickstart`'s script, shortened with --quick: every stage runs the
user's tool, and what it reports is what pycocotools, onnxruntime and the
files on disk say."""

import os
import os.path as osp
import pickle
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

pytestmark = pytest.mark.slow

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('quickstart') / 'qs'
    # The tools import this checkout's package, not an installed copy.
    env = dict(
        os.environ,
        MPLBACKEND='Agg',
        OMP_NUM_THREADS='1',
        PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
    )
    proc = subprocess.run(
        [
            sys.executable,
            osp.join(ROOT, 'scripts', 'quickstart.py'),
            '--quick',
            '--out-dir',
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def printed_paths(stdout: str) -> dict:
    """The 'where everything is' lines at the end of the output."""
    tail = stdout.split('[quickstart] where everything is:')[1]
    paths = {}
    for line in tail.splitlines()[1:]:
        m = re.match(r'^  (\w+)\s+(\S+)$', line)
        if not m:
            break
        paths[m.group(1)] = m.group(2)
    return paths


def test_runs_the_users_tools_stage_by_stage(quick_run):
    _, stdout = quick_run
    for k, tool in enumerate(
        (
            'projects/synthetic_coco/generate.py',
            'tools/train.py',
            'tools/test.py',
            'tools/export_onnx.py',
            'tools/image_demo.py',
            'tools/visualize_attention.py',
        ),
        start=1,
    ):
        header = re.search(
            rf'\[quickstart\] {k}/6 [^\n]*\n\$ python {re.escape(tool)} ',
            stdout,
        )
        assert header, f'stage {k} ({tool}) not shown'
    # mmengine's own training log is what shows the training's progress.
    assert re.search(r'Iter\(train\) \[\s*2/2\]', stdout)


def test_ap_table_is_pycocotools_on_the_dumped_predictions(quick_run):
    out, stdout = quick_run
    paths = printed_paths(stdout)
    with open(osp.join(ROOT, paths['coco_ap'])) as f:
        lines = f.read().splitlines()
    assert len(lines) == 12  # COCOeval.summarize: 6 AP + 6 AR lines
    reported_ap = float(lines[0].rsplit('=', 1)[1])

    # Recompute from the detections tools/test.py dumped (--out).
    with open(osp.join(ROOT, paths['predictions']), 'rb') as f:
        preds = pickle.load(f)
    ann_file = out / 'data' / 'annotations' / 'instances_val.json'
    gt = COCO(str(ann_file))
    cat_ids = gt.getCatIds()
    dets = []
    for p in preds:
        inst = p['pred_instances']
        boxes = np.asarray(inst['bboxes'])
        for box, score, label in zip(
            boxes, np.asarray(inst['scores']), np.asarray(inst['labels'])
        ):
            x1, y1, x2, y2 = (float(v) for v in box)
            dets.append(
                dict(
                    image_id=int(p['img_id']),
                    category_id=cat_ids[int(label)],
                    bbox=[x1, y1, x2 - x1, y2 - y1],
                    score=float(score),
                )
            )
    assert dets, 'score_thr 0 keeps boxes: the AP must be computed on some'
    ev = COCOeval(gt, gt.loadRes(dets), 'bbox')
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert reported_ap == pytest.approx(round(ev.stats[0], 3), abs=1e-3)


def test_checkpoint_onnx_and_pictures_are_where_it_says(quick_run):
    import onnxruntime as ort
    import torch

    from mmdet_dyhead.checkpoint import mmengine_safe_globals

    _, stdout = quick_run
    paths = {k: osp.join(ROOT, v) for k, v in printed_paths(stdout).items()}
    with mmengine_safe_globals():
        ckpt = torch.load(paths['checkpoint'], weights_only=True)
    assert any('dyhead_blocks.1.' in k for k in ckpt['state_dict'])

    session = ort.InferenceSession(
        paths['onnx'], providers=['CPUExecutionProvider']
    )
    outs = session.run(
        None, {'input': np.zeros((1, 3, 160, 160), dtype=np.float32)}
    )
    # ATSS on 5 levels: class scores, boxes and centerness per level.
    assert len(outs) == 15

    pictures = sorted(os.listdir(paths['detections']))
    assert len(pictures) == 4
    for name in pictures:
        img = cv2.imread(osp.join(paths['detections'], name))
        assert img is not None and img.shape[0] > 0
    plots = [n for n in os.listdir(paths['attention']) if n.endswith('.png')]
    assert plots
