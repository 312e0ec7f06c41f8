"""Inference as mmdet users run it: ``DetInferencer`` through
``tools/image_demo.py``, on generated images, against ``tools/test.py``."""

import copy
import json
import os
import os.path as osp
import pickle
import shutil

import numpy as np
import pytest
from mmengine.config import Config

from mmdet_dyhead.cli import image_demo
from mmdet_dyhead.cli import test as test_tool
from tests.helpers import train_tiny_dyhead

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures('one_thread')]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny ATSS + DyHead trained for 2 iterations by tools/train.py."""
    root = tmp_path_factory.mktemp('inference')
    data, _, config, ckpt = train_tiny_dyhead(root, 'inference_train')
    return root, data, config, ckpt


def test_image_demo_predicts_what_the_test_tool_predicts(trained, tmp_path):
    root, data, config, ckpt = trained
    val_dir = osp.join(data['data_root'], data['val_img_dir'])
    out_dir = tmp_path / 'demo'
    result = image_demo.main(
        [
            val_dir,
            config,
            '--weights',
            ckpt,
            '--out-dir',
            str(out_dir),
            '--pred-score-thr',
            '0',
        ]
    )
    images = sorted(os.listdir(val_dir))
    assert sorted(os.listdir(out_dir / 'vis')) == images
    assert len(result['predictions']) == len(images)

    # The same checkpoint through mmdet's test script.
    cfg = Config.fromfile(config)
    cfg.experiment_name = 'inference_test'
    test_config = str(tmp_path / 'test_cfg.py')
    cfg.dump(test_config)
    dumped = str(tmp_path / 'preds.pkl')
    test_tool.main([test_config, ckpt, '--out', dumped])
    with open(dumped, 'rb') as f:
        reference = {
            osp.basename(r['img_path']): r['pred_instances']
            for r in pickle.load(f)
        }
    for image in images:
        with open(out_dir / 'preds' / (osp.splitext(image)[0] + '.json')) as f:
            pred = json.load(f)
        ref = reference[image]
        n = min(20, len(ref['scores']))
        np.testing.assert_allclose(
            pred['scores'][:n], ref['scores'][:n].numpy(), rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            pred['bboxes'][:n], ref['bboxes'][:n].numpy(), rtol=1e-4, atol=1e-2
        )
        assert pred['labels'][:n] == ref['labels'][:n].tolist()


def test_image_demo_refuses_a_dyhead_config_without_custom_imports(
    trained, tmp_path
):
    _, data, config, ckpt = trained
    plain = copy.deepcopy(Config.fromfile(config).to_dict())
    del plain['custom_imports']
    bad = str(tmp_path / 'no_imports.py')
    Config(plain).dump(bad)
    image = osp.join(data['data_root'], data['val_img_dir'])
    with pytest.raises(SystemExit, match='custom_imports'):
        image_demo.main([image, bad, '--weights', ckpt])


@pytest.mark.parametrize(
    'content, problem',
    [(b'', 'is empty'), (b'not an image', 'is not an image')],
)
def test_image_demo_names_an_empty_or_broken_image(
    trained, tmp_path, content, problem
):
    """OpenCV alone stops with `!buf.empty()` and no file name."""
    _, data, config, ckpt = trained
    folder = tmp_path / 'images'
    folder.mkdir()
    val = osp.join(data['data_root'], data['val_img_dir'])
    shutil.copy(osp.join(val, sorted(os.listdir(val))[0]), folder / 'a.png')
    (folder / 'b.png').write_bytes(content)
    with pytest.raises(SystemExit, match=rf'b\.png {problem}'):
        image_demo.main([str(folder), config, '--weights', ckpt])


def test_image_demo_on_a_folder_without_images_says_so(tmp_path):
    """Issue 33: DetInferencer would run on nothing and exit 0. A folder
    holding other files, and images only in a subfolder (not searched, as
    in DetInferencer), stops with the folder and the extensions named."""
    from mmdet.apis.det_inferencer import IMG_EXTENSIONS

    from tests.helpers import TRAIN_BASE_CONFIG

    folder = tmp_path / 'photos'
    (folder / 'nested').mkdir(parents=True)
    (folder / 'notes.txt').write_text('not an image')
    # Its content does not matter: the folder is refused before reading.
    (folder / 'nested' / 'a.jpg').write_bytes(b'\xff\xd8')
    out_dir = tmp_path / 'out'
    with pytest.raises(SystemExit) as e:
        image_demo.main(
            [str(folder), TRAIN_BASE_CONFIG, '--out-dir', str(out_dir)]
        )
    # A string exit code: Python prints it and exits with status 1.
    message = e.value.code
    assert isinstance(message, str), message
    assert str(folder) in message and 'no images' in message, message
    assert all(ext in message for ext in IMG_EXTENSIONS), message
    assert not out_dir.exists()
