"""The quickstart: its configs, its output-folder guard, and a very short run
whose table is checked against pycocotools' own evaluation."""

import json
import os
import os.path as osp
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import REPO_ROOT, subprocess_env
from mmengine.config import Config
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mmdet_dyhead.cli import quickstart as quickstart_module
from mmdet_dyhead.cli import study_ablation as study
from mmdet_dyhead.testing import SYNTHETIC_CLASSES, generate_synthetic_coco

CONFIG_DIR = osp.join(REPO_ROOT, 'configs', 'quickstart')
QUICKSTART = osp.join(REPO_ROOT, 'tools', 'quickstart.py')


@pytest.fixture(scope='module')
def quickstart():
    return quickstart_module


def test_tools_read_the_checkouts_configs_and_write_to_work_dirs(
    quickstart,
):
    # The tools' logic lives in mmdet_dyhead/cli/; configs stay
    # repo-relative, outputs go to work_dirs/ of the current directory.
    assert quickstart.config_dir() == CONFIG_DIR
    assert quickstart.parse_args([]).out_dir == osp.join(
        'work_dirs', 'quickstart'
    )
    args = study.parse_args([])
    assert args.out_dir == osp.join('work_dirs', 'study_ablation')
    assert args.doc is None  # the table goes to --out-dir


def test_configs_match_the_dataset_and_differ_only_in_the_head(quickstart):
    base = Config.fromfile(osp.join(CONFIG_DIR, quickstart.MODELS['ATSS']))
    dy = Config.fromfile(
        osp.join(CONFIG_DIR, quickstart.MODELS['ATSS + DyHead'])
    )
    for cfg in (base, dy):
        assert tuple(cfg.classes) == SYNTHETIC_CLASSES
        assert (
            tuple(cfg.train_dataloader.dataset.metainfo.classes)
            == SYNTHETIC_CLASSES
        )
        assert cfg.model.bbox_head.num_classes == len(SYNTHETIC_CLASSES)
        assert cfg.model.backbone.init_cfg is None  # nothing to download
        assert cfg.randomness.seed == 0
    # The baseline keeps mmdet's ATSS head (4 stacked convs, inherited);
    # the DyHead model replaces them by DyHeadNeck blocks after the FPN.
    assert base.model.bbox_head.stacked_convs == 4
    assert dy.model.bbox_head.stacked_convs == 0
    assert [n.type for n in dy.model.neck] == ['FPN', 'DyHeadNeck']
    assert dy.model.neck[0] == dict(base.model.neck, type='FPN')
    assert dy.model.backbone == base.model.backbone
    assert dy.train_cfg == base.train_cfg
    # Same optimizer; the DyHead model only trains its offset convs (a
    # parameter group the baseline does not have) at a lower rate.
    dy_optim = dy.optim_wrapper.to_dict()
    paramwise = dy_optim.pop('paramwise_cfg')
    assert dy_optim == base.optim_wrapper.to_dict()
    assert paramwise == dict(custom_keys=dict(offset_conv=dict(lr_mult=0.1)))


def test_mmdet_coco_dataset_reads_the_synthetic_data(tmp_path, quickstart):
    from mmdet.registry import DATASETS
    from mmdet.utils import register_all_modules

    register_all_modules()
    paths = generate_synthetic_coco(
        str(tmp_path / 'd'), num_train=3, num_val=2, image_size=64, seed=0
    )
    cfg = Config.fromfile(osp.join(CONFIG_DIR, quickstart.MODELS['ATSS']))
    ds_cfg = cfg.train_dataloader.dataset
    ds_cfg.data_root = paths['data_root'] + os.sep
    dataset = DATASETS.build(ds_cfg)
    coco = COCO(paths['train_ann'])
    with_boxes = [i for i in coco.getImgIds() if coco.getAnnIds(imgIds=i)]
    assert len(dataset) == len(with_boxes)
    sample = dataset[0]
    img_id = sample['data_samples'].img_id
    want = sorted(
        a['category_id'] - 1
        for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id))
    )
    got = sorted(sample['data_samples'].gt_instances.labels.tolist())
    assert got == want


def test_refuses_a_foreign_output_folder(tmp_path, quickstart):
    out = tmp_path / 'mine'
    out.mkdir()
    (out / 'thesis.tex').write_text('precious')
    with pytest.raises(SystemExit, match='not made by the quickstart'):
        quickstart.main(['--quick', '--out-dir', str(out)])
    assert sorted(os.listdir(out)) == ['thesis.tex']


def test_its_own_folder_may_be_reused_and_overwrite_is_explicit(
    tmp_path, quickstart
):
    out = str(tmp_path / 'qs')
    quickstart.prepare_out_dir(out, False, dict(run=1))
    (tmp_path / 'qs' / 'results.md').write_text('old')
    quickstart.prepare_out_dir(out, False, dict(run=2))  # marked as ours
    assert json.load(open(osp.join(out, quickstart.MARKER))) == dict(run=2)
    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'a.txt').write_text('x')
    quickstart.prepare_out_dir(str(foreign), True, {})  # --overwrite
    assert (foreign / 'a.txt').read_text() == 'x'


def test_bad_counts_are_rejected(capsys, quickstart):
    for flag in ('--iters', '--num-val', '--image-size', '--threads'):
        with pytest.raises(SystemExit):
            quickstart.parse_args([flag, '0'])
        assert f'{flag} must be >= 1' in capsys.readouterr().err


@pytest.mark.slow
def test_quick_run_trains_both_and_writes_the_table(tmp_path):
    # No --out-dir: everything goes to work_dirs/quickstart of the cwd.
    out = tmp_path / 'work_dirs' / 'quickstart'
    cmd = [sys.executable, QUICKSTART, '--quick']
    proc = subprocess.run(
        cmd,
        env=subprocess_env(),
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert os.listdir(tmp_path) == ['work_dirs']
    log = proc.stdout + proc.stderr
    # Progress is visible: iterations, losses and the ETA.
    assert 'Iter(train) [2/2]' in log and 'loss:' in log and 'eta:' in log

    results = json.load(open(out / 'results.json'))
    rows = {r['model']: r for r in results['rows']}
    assert set(rows) == {'ATSS', 'ATSS + DyHead'}
    table = (out / 'results.md').read_text()
    assert table.splitlines()[0].startswith(
        '| Model | AP | AP50 | AP75 | APs | APm | APl |'
    )
    for name, row in rows.items():
        assert f'| {name} | {row["AP"]:.1f} | {row["AP50"]:.1f} |' in table
        assert f'{row["ms_per_img"]:.1f} |' in table
        assert row['train_s'] > 0 and row['ms_per_img'] > 0
        # The AP numbers are mmdet's CocoMetric; recompute them with
        # pycocotools from the detections it saved.
        work = out / osp.splitext(quickstart_module.MODELS[name])[0]
        gt = COCO(str(out / 'data' / 'annotations' / 'instances_val.json'))
        dets = json.load(open(work / 'val_predictions.bbox.json'))
        assert dets, 'score_thr 0 in --quick must leave detections'
        ev = COCOeval(gt, gt.loadRes(dets), 'bbox')
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        for k, key in enumerate(['AP', 'AP50', 'AP75', 'APs', 'APm', 'APl']):
            if ev.stats[k] < 0:  # no ground truth of that size
                assert row[key] is None, key
            else:
                assert row[key] == pytest.approx(
                    100 * round(float(ev.stats[k]), 3), abs=1e-6
                ), key
    chart = cv2.imread(str(out / 'results.png'))
    assert chart is not None and chart.shape[0] > 100
    assert np.unique(chart.reshape(-1, 3), axis=0).shape[0] > 10


def test_ablation_study_switches_reach_the_blocks(tmp_path, quickstart):
    import argparse

    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    data = dict(data_root=str(tmp_path), val_ann=str(tmp_path / 'v.json'))
    qs_args = argparse.Namespace(
        image_size=None, batch_size=None, iters=7, seed=1, quick=False
    )
    base = osp.join(CONFIG_DIR, quickstart.MODELS['ATSS'])
    dy = osp.join(CONFIG_DIR, quickstart.MODELS['ATSS + DyHead'])
    assert study.PAPER_ROWS[0] == 'baseline' and len(study.PAPER_ROWS) == 6
    for row in study.PAPER_ROWS:
        cfg = study.variant_cfg(
            quickstart,
            row,
            base,
            dy,
            data,
            str(tmp_path / 'w'),
            qs_args,
            num_blocks=1,
        )
        assert cfg.train_cfg.max_iters == 7 and cfg.randomness.seed == 1
        model = MODELS.build(cfg.model)
        if row == 'baseline':
            assert model.bbox_head.stacked_convs == 4
            assert not isinstance(model.neck, (list, tuple))
            continue
        blocks = list(model.neck[1].dyhead_blocks)
        assert len(blocks) == 1
        use_l, use_s, use_c = row
        assert (blocks[0].scale_attn is not None) == bool(use_l)
        assert (blocks[0].task_attn is not None) == bool(use_c)
        has_offsets = any('offset' in n for n, _ in blocks[0].named_modules())
        assert has_offsets == bool(use_s)


def test_ablation_study_writes_its_table_to_work_dirs_unless_told(
    tmp_path, monkeypatch, quickstart
):
    import torch

    trained = []

    def fake_train(name, cfg):
        # The real one trains for minutes; the study's own logic is tested.
        trained.append((name, cfg.work_dir))
        return dict(
            model=name,
            train_s=60.0,
            ms_per_img=10.0,
            params_m=1.0,
            **{m: 1.0 for m, _ in quickstart.METRICS},
        )

    monkeypatch.setattr(quickstart, 'train_and_evaluate', fake_train)
    # main() sets torch's thread count for its run; not for the test session.
    monkeypatch.setattr(torch, 'set_num_threads', lambda n: None)
    monkeypatch.chdir(tmp_path)
    small = ['--num-train', '2', '--num-val', '1', '--iters', '3']
    study.main(small)
    out = tmp_path / 'work_dirs' / 'study_ablation'
    assert sorted(os.listdir(tmp_path)) == ['work_dirs']
    assert [w for _, w in trained][:2] == [
        str(out / 'baseline'),
        str(out / 'lsc100'),
    ]
    doc = (out / 'ablation_synthetic.md').read_text()
    assert (
        '- Command: `python tools/study_ablation.py ' + ' '.join(small) + '`'
        in doc
    )
    assert len(json.load(open(out / 'results.json'))) == 6

    # --doc writes the table elsewhere and says so in its command line.
    (tmp_path / 'docs').mkdir()
    study.main(small + ['--doc', 'docs/ablation.md'])
    doc = (tmp_path / 'docs' / 'ablation.md').read_text()
    assert '--iters 3 --doc docs/ablation.md`' in doc
