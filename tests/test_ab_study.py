"""The A/B study: its configs, its output-folder guard, and a very short run
whose table is checked against pycocotools' own evaluation."""

import json
import os
import os.path as osp
import subprocess
import sys

import cv2
import numpy as np
import pytest
from mmengine.config import Config
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from projects.ab_study import ab_study as quickstart_module
from projects.ab_study import study_ablation as study
from projects.synthetic_coco import SYNTHETIC_CLASSES, generate_synthetic_coco
from tests.helpers import REPO_ROOT, subprocess_env

CONFIG_DIR = osp.join(REPO_ROOT, 'configs', 'quickstart')
QUICKSTART = osp.join(REPO_ROOT, 'projects', 'ab_study', 'ab_study.py')


@pytest.fixture(scope='module')
def quickstart():
    return quickstart_module


def test_tools_read_the_checkouts_configs_and_write_to_work_dirs(
    quickstart,
):
    # The study runs from the checkout: configs are the checkout's,
    # outputs go to work_dirs/ of the current directory.
    assert quickstart.config_dir() == CONFIG_DIR
    assert quickstart.parse_args([]).out_dir == osp.join(
        'work_dirs', 'ab_study'
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
    # The baseline keeps mmdet's ATSS head (4 stacked convs per branch,
    # inherited); the DyHead model replaces them by DyHeadNeck blocks.
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
    assert paramwise == dict(custom_keys=dict(offset_conv=dict(lr_mult=0.025)))
    # The pre-training detector shares data, backbone, FPN and optimizer
    # with the baseline; only its head (RetinaNet's, not under test) differs.
    pre = Config.fromfile(osp.join(CONFIG_DIR, quickstart.PRETRAIN_CONFIG))
    assert pre.model.type == 'RetinaNet'
    assert pre.model.bbox_head.type == 'RetinaHead'
    assert pre.model.bbox_head.num_classes == len(SYNTHETIC_CLASSES)
    for key in ('backbone', 'neck', 'data_preprocessor'):
        assert pre.model[key] == base.model[key], key
    for key in ('train_dataloader', 'train_cfg', 'param_scheduler'):
        assert pre[key] == base[key], key
    # The same optimizer; only the learning rate is the pre-training's own.
    pre_optim, base_optim = (c.optim_wrapper.to_dict() for c in (pre, base))
    assert pre_optim['optimizer'].pop('lr') == 2e-3
    base_optim['optimizer'].pop('lr')
    assert pre_optim == base_optim


def test_both_detectors_start_from_the_shared_pretrained_weights(
    tmp_path, quickstart
):
    import argparse

    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    # A stand-in for the pre-training's output: the pretrain detector's own
    # random weights, backbone and FPN keys only, as pretrain() saves them.
    pre = Config.fromfile(osp.join(CONFIG_DIR, quickstart.PRETRAIN_CONFIG))
    torch.manual_seed(3)
    source = MODELS.build(pre.model).state_dict()
    saved = {
        k: v.clone()
        for k, v in source.items()
        if k.startswith(('backbone.', 'neck.'))
    }
    ckpt = str(tmp_path / 'backbone_fpn.pth')
    torch.save(dict(state_dict=saved), ckpt)
    data = dict(data_root=str(tmp_path), val_ann=str(tmp_path / 'v.json'))
    args = argparse.Namespace(
        image_size=None, batch_size=None, iters=5, quick=False, seed=0
    )
    for name, fpn_prefix in (('ATSS', 'neck.'), ('ATSS + DyHead', 'neck.0.')):
        cfg = quickstart.build_cfg(
            osp.join(CONFIG_DIR, quickstart.MODELS[name]),
            name,
            data,
            str(tmp_path / 'w'),
            args,
            seed=1,
            pretrained=ckpt,
        )
        assert cfg.randomness.seed == 1
        model = MODELS.build(cfg.model)
        model.init_weights()
        state = model.state_dict()
        for key, value in saved.items():
            mine = key.replace('neck.', fpn_prefix, 1)
            assert torch.equal(state[mine], value), (name, key)
        # The head is fresh: not the pretrain detector's.
        assert not any(k.startswith('bbox_head.') for k in saved)
        # Frozen BN statistics, as mmdet does with ImageNet weights.
        assert model.backbone.norm_eval


def test_octave_ap_is_cocos_ap_restricted_to_each_size_range(
    tmp_path, quickstart
):
    paths = generate_synthetic_coco(
        str(tmp_path / 'd'), num_train=1, num_val=6, image_size=128, seed=2
    )
    gt = json.load(open(paths['val_ann']))
    dets_file = str(tmp_path / 'dets.json')

    def side(ann):
        return ann['area'] ** 0.5

    def write(anns):
        json.dump(
            [
                dict(
                    image_id=a['image_id'],
                    category_id=a['category_id'],
                    bbox=a['bbox'],
                    score=1.0,
                )
                for a in anns
            ],
            open(dets_file, 'w'),
        )

    populated = {
        name
        for name, lo, hi in quickstart.OCTAVES
        if any(lo <= side(a) < hi for a in gt['annotations'])
    }
    assert len(populated) >= 2
    # Every ground-truth box detected exactly: AP 100 wherever there is
    # ground truth, None (no AP) where an octave has none.
    write(gt['annotations'])
    got = quickstart.octave_ap(paths['val_ann'], dets_file)
    for name, _, _ in quickstart.OCTAVES:
        if name in populated:
            assert got[name] == pytest.approx(100.0), name
        else:
            assert got[name] is None, name
    # Only the boxes of one octave detected: 100 there, 0 in the others.
    name, lo, hi = next(o for o in quickstart.OCTAVES if o[0] in populated)
    write([a for a in gt['annotations'] if lo <= side(a) < hi])
    got = quickstart.octave_ap(paths['val_ann'], dets_file)
    assert got[name] == pytest.approx(100.0)
    assert all(got[n] == 0.0 for n in populated - {name})


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
    with pytest.raises(SystemExit, match='not made by the A/B study'):
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
    for flag in (
        '--iters',
        '--pretrain-iters',
        '--num-val',
        '--num-test',
        '--image-size',
        '--workers',
        '--threads',
    ):
        with pytest.raises(SystemExit):
            quickstart.parse_args([flag, '0'])
        assert f'{flag} must be >= 1' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quickstart.parse_args(['--seeds', '1', '1'])
    assert '--seeds must be distinct' in capsys.readouterr().err


@pytest.mark.slow
def test_quick_run_trains_both_and_writes_the_table(tmp_path):
    # No --out-dir: everything goes to work_dirs/ab_study of the cwd.
    out = tmp_path / 'work_dirs' / 'ab_study'

    def quickstart_cli(*extra):
        proc = subprocess.run(
            [sys.executable, QUICKSTART, '--quick', *extra],
            env=subprocess_env(),
            cwd=str(tmp_path),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    log = quickstart_cli('--seeds', '0', '1')
    assert os.listdir(tmp_path) == ['work_dirs']
    # Progress is visible: the pre-training, then every run's iterations.
    assert 'pre-training backbone + FPN' in log
    for name in ('ATSS', 'ATSS + DyHead'):
        for seed in (0, 1):
            assert f'[{name}, seed {seed}] iter 2/2, loss' in log
    # Each run's full mmengine log is in its work_dir.
    run_log = (
        out / 'atss_r18-tiny_fpn_synthetic' / 'seed1' / 'run.log'
    ).read_text()
    assert 'Iter(train) [2/2]' in run_log and 'eta:' in run_log

    results = json.load(open(out / 'results.json'))
    rows = results['rows']
    assert sorted((r['model'], r['seed']) for r in rows) == [
        ('ATSS', 0),
        ('ATSS', 1),
        ('ATSS + DyHead', 0),
        ('ATSS + DyHead', 1),
    ]
    table = (out / 'results.md').read_text()
    assert table.startswith('Test split, mean ± std over seeds [0, 1]')
    gt_test = COCO(str(out / 'data' / 'annotations' / 'instances_test.json'))
    gt_val = COCO(str(out / 'data' / 'annotations' / 'instances_val.json'))
    for row in rows:
        assert row['split'] == 'test'
        assert row['train_s'] > 0 and row['ms_per_img'] > 0
        # The AP numbers are mmdet's CocoMetric; recompute them with
        # pycocotools from the detections it saved, on both splits.
        work = (
            out
            / osp.splitext(quickstart_module.MODELS[row['model']])[0]
            / f'seed{row["seed"]}'
        )
        for gt, prefix, got in (
            (gt_test, 'test', row),
            (gt_val, 'val', row['val']),
        ):
            dets = json.load(open(work / f'{prefix}_predictions.bbox.json'))
            assert dets, 'score_thr 0 in --quick must leave detections'
            ev = COCOeval(gt, gt.loadRes(dets), 'bbox')
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            keys = ['AP', 'AP50', 'AP75', 'APs', 'APm', 'APl']
            for k, key in enumerate(keys):
                if ev.stats[k] < 0:  # no ground truth of that size
                    assert got[key] is None, key
                else:
                    assert got[key] == pytest.approx(
                        100 * round(float(ev.stats[k]), 3), abs=1e-6
                    ), (prefix, key)
    # The table's row is the mean over the seeds, with their spread.
    for s in results['summary']:
        aps = [r['AP'] for r in rows if r['model'] == s['model']]
        assert s['AP'] == pytest.approx(np.mean(aps))
        assert s['AP_std'] == pytest.approx(np.std(aps, ddof=1))
        assert f'| {s["model"]} | {s["AP"]:.1f} ± {s["AP_std"]:.1f} |' in (
            table
        )
    chart = cv2.imread(str(out / 'results.png'))
    assert chart is not None and chart.shape[0] > 100
    assert np.unique(chart.reshape(-1, 3), axis=0).shape[0] > 10

    # A rerun reuses the pre-trained weights; other pre-training options
    # retrain them.
    log = quickstart_cli('--models', 'ATSS')
    assert 'reusing' in log and 'pre-training backbone + FPN' not in log
    log = quickstart_cli('--models', 'ATSS', '--pretrain-iters', '3')
    assert 'pre-training backbone + FPN with a RetinaNet head (3 ' in log

    # Tuning runs look at the val split only: the test split is not scored.
    quickstart_cli(
        '--models', 'ATSS', '--eval-split', 'val', '--run-name', 'tune'
    )
    tune = json.load(open(out / 'tune' / 'results.json'))
    assert [r['split'] for r in tune['rows']] == ['val']
    assert tune['rows'][0]['AP'] == tune['rows'][0]['val']['AP']
    work = out / 'tune' / 'atss_r18-tiny_fpn_synthetic' / 'seed0'
    assert (work / 'val_predictions.bbox.json').is_file()
    assert not (work / 'test_predictions.bbox.json').exists()
    assert (
        (out / 'tune' / 'results.md').read_text().startswith('Val split, mean')
    )


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
    trained = []

    def fake_pretrain(args, data, out_dir):
        return str(tmp_path / 'backbone_fpn.pth')

    def fake_run_jobs(jobs, workers):
        # The real one trains for minutes; the study's own logic is tested.
        rows = []
        for job in jobs:
            trained.append((job['name'], job['cfg'].work_dir))
            assert job['cfg'].model.backbone.init_cfg.checkpoint == (
                str(tmp_path / 'backbone_fpn.pth')
            )
            rows.append(
                dict(
                    model=job['name'],
                    train_s=60.0,
                    ms_per_img=10.0,
                    params_m=1.0,
                    split='val',
                    val=dict(AP=1.0 + job['record']['seed']),
                    octaves={n: 1.0 for n, _, _ in quickstart.OCTAVES},
                    **{
                        m: 1.0 + job['record']['seed']
                        for m, _ in quickstart.METRICS
                    },
                    **job['record'],
                )
            )
        return rows

    monkeypatch.setattr(quickstart, 'pretrain', fake_pretrain)
    monkeypatch.setattr(quickstart, 'run_jobs', fake_run_jobs)
    monkeypatch.chdir(tmp_path)
    small = ['--num-train', '2', '--num-val', '1', '--iters', '3']
    study.main(small)
    out = tmp_path / 'work_dirs' / 'study_ablation'
    assert sorted(os.listdir(tmp_path)) == ['work_dirs']
    assert [w for _, w in trained][:2] == [
        str(out / 'baseline' / 'seed0'),
        str(out / 'lsc100' / 'seed0'),
    ]
    assert len(trained) == 12  # six rows, seeds 0 and 1
    doc = (out / 'ablation_synthetic.md').read_text()
    assert (
        '- Command: `python projects/ab_study/study_ablation.py '
        + ' '.join(small)
        + '`'
        in doc
    )
    # Seeds 0 and 1 gave AP 1 and 2: mean 1.5, sample std 0.7.
    assert '| – | – | – | 1.5 ± 0.7 |' in doc
    assert len(json.load(open(out / 'results.json'))['summary']) == 6

    # --doc writes the table elsewhere and says so in its command line.
    (tmp_path / 'docs').mkdir()
    study.main(small + ['--doc', 'docs/ablation.md'])
    doc = (tmp_path / 'docs' / 'ablation.md').read_text()
    assert '--iters 3 --doc docs/ablation.md`' in doc
