"""The synthetic COCO-format dataset: valid for pycocotools, deterministic,
scale-diverse, class balance as asked, clear errors on bad input."""

import filecmp
import json
import os
import os.path as osp
from collections import Counter

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from projects.synthetic_coco import (
    SYNTHETIC_CLASSES,
    generate_synthetic_coco,
    read_synthetic_meta,
)
from projects.synthetic_coco import generate as tool


@pytest.fixture(scope='module')
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp('syn') / 'data'
    return generate_synthetic_coco(
        str(out), num_train=6, num_val=3, image_size=(96, 128), seed=3
    )


def test_layout_and_returned_paths(small_set):
    root = small_set['data_root']
    assert osp.isabs(root)
    assert small_set['train_ann'] == osp.join(
        root, 'annotations', 'instances_train.json'
    )
    assert small_set['val_ann'] == osp.join(
        root, 'annotations', 'instances_val.json'
    )
    assert small_set['train_img_dir'] == osp.join(root, 'train')
    assert small_set['val_img_dir'] == osp.join(root, 'val')
    assert len(os.listdir(small_set['train_img_dir'])) == 6
    assert len(os.listdir(small_set['val_img_dir'])) == 3


@pytest.mark.parametrize('split', ['train', 'val'])
def test_pycocotools_loads_it_and_annotations_match_pixels(small_set, split):
    coco = COCO(small_set[f'{split}_ann'])
    cats = coco.loadCats(coco.getCatIds())
    assert [c['name'] for c in sorted(cats, key=lambda c: c['id'])] == list(
        SYNTHETIC_CLASSES
    )
    assert len(coco.getImgIds()) == {'train': 6, 'val': 3}[split]
    assert len(set(coco.anns)) == len(coco.dataset['annotations']) > 0
    for img_info in coco.loadImgs(coco.getImgIds()):
        img = cv2.imread(
            osp.join(small_set[f'{split}_img_dir'], img_info['file_name'])
        )
        assert (
            img.shape
            == (img_info['height'], img_info['width'], 3)
            == (96, 128, 3)
        )
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_info['id'])):
            x, y, w, h = ann['bbox']
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= img_info['width'] and y + h <= img_info['height']
            assert ann['iscrowd'] == 0
            # Box and area are those of the visible mask (COCO's convention),
            # recomputed here by pycocotools from the stored RLE.
            mask = coco.annToMask(ann)
            assert mask.sum() == ann['area']
            ys, xs = np.nonzero(mask)
            assert [
                xs.min(),
                ys.min(),
                xs.max() + 1 - xs.min(),
                ys.max() + 1 - ys.min(),
            ] == ann['bbox']
            assert np.allclose(
                mask_utils.toBbox(
                    mask_utils.frPyObjects(
                        ann['segmentation'],
                        h=img_info['height'],
                        w=img_info['width'],
                    )
                ),
                ann['bbox'],
            )


def test_same_seed_same_files_other_seed_other_images(tmp_path):
    a = generate_synthetic_coco(
        str(tmp_path / 'a'), num_train=3, num_val=2, image_size=64, seed=7
    )
    b = generate_synthetic_coco(
        str(tmp_path / 'b'), num_train=3, num_val=2, image_size=64, seed=7
    )
    c = generate_synthetic_coco(
        str(tmp_path / 'c'), num_train=3, num_val=2, image_size=64, seed=8
    )
    for key in ('train_ann', 'val_ann'):
        assert filecmp.cmp(a[key], b[key], shallow=False)
        assert not filecmp.cmp(a[key], c[key], shallow=False)
    for name in os.listdir(a['train_img_dir']):
        assert np.array_equal(
            cv2.imread(osp.join(a['train_img_dir'], name)),
            cv2.imread(osp.join(b['train_img_dir'], name)),
        )
    # More training images leave the validation set unchanged.
    d = generate_synthetic_coco(
        str(tmp_path / 'd'), num_train=5, num_val=2, image_size=64, seed=7
    )
    assert filecmp.cmp(a['val_ann'], d['val_ann'], shallow=False)


def test_class_balance_follows_class_weights(tmp_path):
    weights = (4, 1, 1, 1, 1, 0)
    paths = generate_synthetic_coco(
        str(tmp_path / 'w'),
        num_train=40,
        num_val=1,
        image_size=64,
        seed=0,
        class_weights=weights,
    )
    anns = json.load(open(paths['train_ann']))['annotations']
    counts = Counter(a['category_id'] for a in anns)
    total = sum(counts.values())
    assert total >= 150
    assert counts[6] == 0  # weight 0: never drawn
    for cat_id, weight in enumerate(weights, start=1):
        assert abs(counts[cat_id] / total - weight / sum(weights)) < 0.1


def test_uniform_default_balance_and_all_coco_scales(tmp_path):
    paths = generate_synthetic_coco(
        str(tmp_path / 's'), num_train=24, num_val=1, image_size=256, seed=0
    )
    anns = json.load(open(paths['train_ann']))['annotations']
    counts = Counter(a['category_id'] for a in anns)
    assert set(counts) == set(range(1, len(SYNTHETIC_CLASSES) + 1))
    assert max(counts.values()) < 2 * min(counts.values())
    # COCO's small / medium / large split (area 32^2, 96^2): every bucket
    # holds a real share of the objects, so scale-awareness matters.
    areas = np.array([a['area'] for a in anns])
    buckets = [
        (areas < 32**2).mean(),
        ((areas >= 32**2) & (areas < 96**2)).mean(),
        (areas >= 96**2).mean(),
    ]
    assert min(buckets) > 0.04, buckets
    # Objects are allowed to overlap (occlusion): some boxes intersect.
    by_image = {}
    for a in anns:
        by_image.setdefault(a['image_id'], []).append(a['bbox'])
    overlaps = 0
    for boxes in by_image.values():
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                xi, yi, wi, hi = boxes[i]
                xj, yj, wj, hj = boxes[j]
                overlaps += min(xi + wi, xj + wj) > max(xi, xj) and min(
                    yi + hi, yj + hj
                ) > max(yi, yj)
    assert overlaps > 0


def test_meta_records_options(small_set):
    meta = read_synthetic_meta(small_set['data_root'])
    assert meta['complete'] is True
    assert meta['num_train'] == 6 and meta['image_size'] == [96, 128]
    assert read_synthetic_meta(osp.dirname(small_set['data_root'])) is None


def test_existing_folders_are_not_overwritten_silently(tmp_path):
    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'notes.txt').write_text('keep me')
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match='not made by'):
            generate_synthetic_coco(
                str(foreign),
                num_train=1,
                num_val=1,
                image_size=64,
                overwrite=overwrite,
            )
    assert (foreign / 'notes.txt').read_text() == 'keep me'

    ours = str(tmp_path / 'ours')
    first = generate_synthetic_coco(
        ours, num_train=2, num_val=1, image_size=64
    )
    with pytest.raises(FileExistsError, match='overwrite=True'):
        generate_synthetic_coco(ours, num_train=2, num_val=1, image_size=64)
    stamp = os.path.getmtime(first['train_ann'])
    # reuse with identical options: nothing is rewritten.
    generate_synthetic_coco(
        ours,
        num_train=2,
        num_val=1,
        image_size=64,
        reuse=True,
        overwrite=False,
    )
    assert os.path.getmtime(first['train_ann']) == stamp
    # overwrite with other options: old images are gone, new ones written.
    generate_synthetic_coco(
        ours, num_train=1, num_val=1, image_size=64, overwrite=True
    )
    assert os.listdir(first['train_img_dir']) == ['000000.png']
    assert read_synthetic_meta(ours)['num_train'] == 1


@pytest.mark.parametrize(
    'kwargs, match',
    [
        (dict(num_train=0), 'num_train must be in'),
        (dict(num_val=-1), 'num_val must be in'),
        (dict(num_train=2.5), 'num_train must be an integer'),
        (dict(image_size=16), 'image_size height must be in'),
        (dict(image_size=(64, 10000)), 'image_size width must be in'),
        (dict(image_size=(64, 64, 3)), r'\(height, width\) pair'),
        (dict(image_size='large'), r'\(height, width\) pair'),
        (dict(objects_per_image=(5, 2)), 'objects_per_image max must be in'),
        (dict(size_range=(0.5, 0.2)), '0 < min < max <= 1'),
        (dict(aspect_range=(2.0, 3.0)), 'aspect_range'),
        (dict(min_visible=0), 'min_visible'),
        (dict(clutter=2), 'clutter must be in'),
        (dict(class_weights=(1, 1)), 'class_weights needs 6'),
        (dict(seed=-1), 'seed must be'),
    ],
)
def test_bad_input_is_named(tmp_path, kwargs, match):
    args = dict(num_train=1, num_val=1, image_size=64)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        generate_synthetic_coco(str(tmp_path / 'x'), **args)
    assert not (tmp_path / 'x').exists()  # checked before anything is made


def test_command_line_tool(tmp_path, capsys):
    out = str(tmp_path / 'cli')
    tool.main(
        [
            out,
            '--num-train',
            '2',
            '--num-val',
            '1',
            '--image-size',
            '64',
            '80',
            '--seed',
            '5',
        ]
    )
    assert 'train_ann' in capsys.readouterr().out
    meta = read_synthetic_meta(out)
    assert meta['image_size'] == [64, 80] and meta['seed'] == 5
    with pytest.raises(SystemExit, match='--overwrite'):
        tool.main([out, '--num-train', '2'])
    tool.main(
        [
            out,
            '--num-train',
            '3',
            '--num-val',
            '1',
            '--image-size',
            '64',
            '--overwrite',
        ]
    )
    assert len(os.listdir(osp.join(out, 'train'))) == 3
    with pytest.raises(SystemExit, match='num_val must be in'):
        tool.main([str(tmp_path / 'bad'), '--num-val', '0'])
