"""Every tool reads weights through the package's one loader, tried as a
user: a tiny detector trained by ``tools/train.py``, then its checkpoint
through test, image demo, export and attention plots; a code-running pickle
served over a loopback URL and given with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
to each tool; another detector's checkpoint and broken files.
"""

import collections
import copy
import json
import os
import os.path as osp
import re
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch

from mmdet_dyhead.checkpoint import (
    CheckpointError,
    checkpoint_loaders,
    mmengine_safe_globals,
)
from mmdet_dyhead.cli import image_demo, visualize_attention
from mmdet_dyhead.cli import test as test_tool
from mmdet_dyhead.cli import train as train_tool
from projects.synthetic_coco import (
    mmdet_config_path,
    tiny_detector_cfg,
)
from tests.helpers import REPO_ROOT, subprocess_env, train_tiny_dyhead

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures('one_thread')]

RETINANET = mmdet_config_path('retinanet/retinanet_r50_fpn_1x_coco.py')


class _Reduce:
    """Unpickles as ``func(*args)``."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


class _Touch:
    """Runs ``touch marker`` when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny ATSS + DyHead trained for 2 iterations by tools/train.py,
    another detector's checkpoint, and a live code-running pickle."""
    root = tmp_path_factory.mktemp('route')
    data, cfg, config, ckpt = train_tiny_dyhead(root, 'route_train')

    from mmdet.apis import init_detector

    other = tiny_detector_cfg(RETINANET, data, str(root / 'other'))
    retinanet = init_detector(other, device='cpu')
    foreign = root / 'retinanet.pth'
    torch.save({'meta': {}, 'state_dict': retinanet.state_dict()}, foreign)

    marker = root / 'payload_ran'
    evil = root / 'evil.pth'
    torch.save({'state_dict': {}, 'meta': _Touch(marker)}, evil)
    torch.load(evil, weights_only=False)  # the payload is live
    assert marker.exists()
    marker.unlink()
    val = osp.join(data['data_root'], data['val_img_dir'])
    return dict(
        cfg=cfg,
        config=config,
        ckpt=ckpt,
        foreign=str(foreign),
        evil=evil,
        marker=marker,
        images=val,
        image=osp.join(val, sorted(os.listdir(val))[0]),
    )


def named_config(trained, tmp_path, name, edit=None) -> str:
    """The trained config under its own experiment name (one logger per
    in-process run) and work dir, optionally edited."""
    cfg = copy.deepcopy(trained['cfg'])
    cfg.experiment_name = name
    cfg.work_dir = str(tmp_path / name)
    if edit is not None:
        edit(cfg)
    path = str(tmp_path / f'{name}.py')
    cfg.dump(path)
    return path


def run_test_tool(trained, tmp_path, name, checkpoint, *extra):
    test_tool.main(
        [named_config(trained, tmp_path, name), checkpoint] + list(extra)
    )


def export(trained, tmp_path, checkpoint, *extra) -> int:
    pytest.importorskip('onnx')
    from mmdet_dyhead.cli import export_onnx

    args = [trained['config'], checkpoint, '--out', str(tmp_path / 'm.onnx')]
    return export_onnx.main(args + ['--shape', '64', '64'] + list(extra))


def plot(trained, tmp_path, checkpoint, *extra) -> int:
    args = [trained['config'], checkpoint, '--images', trained['image']]
    args += ['--out-dir', str(tmp_path / 'plots')]
    return visualize_attention.main(args + list(extra))


def demo(trained, tmp_path, checkpoint, *extra):
    args = [trained['images'], trained['config'], '--weights', checkpoint]
    args += ['--out-dir', str(tmp_path / 'demo'), '--no-save-vis']
    return image_demo.main(args + list(extra))


# ----------------------------------------------------------------------------
# a checkpoint of tools/train.py works in every tool
# ----------------------------------------------------------------------------
def test_a_train_checkpoint_works_in_every_tool(trained, tmp_path):
    ckpt = trained['ckpt']
    # torch's weights-only load alone refuses this file (mmengine's message
    # hub); the tools read it.
    with pytest.raises(Exception, match='HistoryBuffer'):
        torch.load(ckpt, weights_only=True)
    with mmengine_safe_globals():
        saved = torch.load(ckpt, weights_only=True)['state_dict']
    run_test_tool(trained, tmp_path, 'works_test', ckpt)
    result = demo(trained, tmp_path, ckpt)
    assert len(result['predictions']) == len(os.listdir(trained['images']))
    assert export(trained, tmp_path, ckpt) == 0
    assert plot(trained, tmp_path, ckpt) == 0
    assert os.listdir(tmp_path / 'plots')
    # what the plots and the export ran is the trained model
    from mmdet.apis import init_detector

    from mmdet_dyhead.checkpoint import load_checkpoint

    model = init_detector(trained['config'], device='cpu')
    assert load_checkpoint(model, ckpt).ok
    for key, value in saved.items():
        assert torch.equal(model.state_dict()[key], value), key


# ----------------------------------------------------------------------------
# a code-running pickle never runs: over a URL, or with the environment
# variable that turns torch's default check off
# ----------------------------------------------------------------------------
TOOLS = (
    'test',
    'demo',
    'inferencer',
    'export',
    'plots',
    'load_from',
    'resume',
    'pretrained',
)


def open_mmlab_entry(trained, home, url=None) -> str:
    """``open-mmlab://evil``, an entry of ``home/open_mmlab.json`` (as
    ``$MMENGINE_HOME``) for the code-running file: a path under ``home``,
    or ``url``."""
    home.mkdir(exist_ok=True)
    shutil.copy(trained['evil'], home / 'evil.pth')
    entry = {'evil': url or 'evil.pth'}
    (home / 'open_mmlab.json').write_text(json.dumps(entry))
    return 'open-mmlab://evil'


@pytest.mark.parametrize('route', ['url', 'env', 'open-mmlab'])
@pytest.mark.parametrize('tool', TOOLS)
def test_a_code_running_checkpoint_is_refused_by_every_tool(
    trained, tmp_path, http_root, monkeypatch, capsys, tool, route
):
    www, base, _ = http_root
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    if route == 'url':
        (www / 'evil.pth').write_bytes(trained['evil'].read_bytes())
        source = f'{base}/evil.pth'
    else:
        monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
        source = str(trained['evil'])
    if route == 'open-mmlab':  # mmengine resolves it, then a bare torch.load
        home = tmp_path / 'mmengine_home'
        monkeypatch.setenv('MMENGINE_HOME', str(home))
        source = open_mmlab_entry(trained, home)
    name = f'evil_{tool}_{route}'
    refused = '(?s)Refused .*evil.pth.*runs commands or code'
    if tool == 'test':
        with pytest.raises(SystemExit, match=refused):
            run_test_tool(trained, tmp_path, name, source)
    elif tool == 'demo':
        with pytest.raises(SystemExit, match=refused):
            demo(trained, tmp_path, source)
    elif tool == 'inferencer':  # the set-up docs/inference.md documents
        from mmdet.apis import DetInferencer

        with (
            checkpoint_loaders(),
            pytest.raises(CheckpointError, match=refused),
        ):
            DetInferencer(
                model=trained['config'], weights=source, device='cpu'
            )
    elif tool in ('export', 'plots'):
        run = export if tool == 'export' else plot
        assert run(trained, tmp_path, source) == 1
        assert 'runs commands or code' in capsys.readouterr().err
    else:
        if tool == 'pretrained':

            def edit(cfg):
                cfg.model.backbone.init_cfg = dict(
                    type='Pretrained', checkpoint=source
                )

            argv = [named_config(trained, tmp_path, name, edit)]
        elif tool == 'load_from':

            def edit(cfg):
                cfg.load_from = source

            argv = [named_config(trained, tmp_path, name, edit)]
        else:
            argv = [named_config(trained, tmp_path, name), '--resume', source]
        with pytest.raises(SystemExit, match=refused):
            train_tool.main(argv)
    assert not trained['marker'].exists()


def test_the_test_script_exits_nonzero_on_a_url_payload(
    trained, tmp_path, http_root
):
    """``python tools/test.py CFG URL`` in a fresh process, as a user runs
    it."""
    www, base, _ = http_root
    (www / 'evil.pth').write_bytes(trained['evil'].read_bytes())
    env = subprocess_env()
    env['TORCH_HOME'] = str(tmp_path / 'torch_home')
    config = named_config(trained, tmp_path, 'evil_subprocess')
    out = subprocess.run(
        [sys.executable, 'tools/test.py', config, f'{base}/evil.pth'],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert 'runs commands or code' in out.stderr
    assert not trained['marker'].exists()


@pytest.mark.parametrize('force', [False, True], ids=['default', 'env'])
def test_the_test_script_refuses_an_open_mmlab_payload(
    trained, tmp_path, force
):
    """``python tools/test.py CFG open-mmlab://NAME`` with a local entry in
    ``$MMENGINE_HOME/open_mmlab.json``, with and without
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``."""
    env = subprocess_env()
    env['MMENGINE_HOME'] = str(tmp_path / 'mmengine_home')
    source = open_mmlab_entry(trained, tmp_path / 'mmengine_home')
    if force:
        env['TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'] = '1'
    config = named_config(trained, tmp_path, f'evil_open_mmlab_{force}')
    out = subprocess.run(
        [sys.executable, 'tools/test.py', config, source],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    home = tmp_path / 'mmengine_home'
    assert f'error: Refused {home}/evil.pth: it tries to call' in out.stderr
    assert 'runs commands or code' in out.stderr
    assert 'Traceback' not in out.stderr
    assert not trained['marker'].exists()


@pytest.mark.parametrize(
    'payload,reason',
    [
        (
            'zero strides',
            r'views 4398046511104 bytes, more than the whole file',
        ),
        ('getattr', r'refused global builtins.getattr'),
    ],
)
def test_hostile_arguments_get_the_diagnosis_through_the_test_tool(
    trained, tmp_path, payload, reason
):
    from mmengine.logging.history_buffer import HistoryBuffer

    if payload == 'zero strides':  # 4 bytes seen as 2^40 floats
        with warnings.catch_warnings():  # TypedStorage is what torch pickles
            warnings.simplefilter('ignore')
            storage = torch.zeros(1).storage()
        crafted = _Reduce(
            torch._utils._rebuild_tensor_v2,
            (
                storage,
                0,
                (2**20, 2**20),
                (0, 0),
                False,
                collections.OrderedDict(),
            ),
        )
    else:
        crafted = _Reduce(getattr, (HistoryBuffer, '__init__'))
    path = tmp_path / 'crafted.pth'
    torch.save({'state_dict': {'w': crafted}}, path)
    with pytest.raises(SystemExit) as err:
        run_test_tool(trained, tmp_path, f'crafted_{payload[:4]}', str(path))
    text = str(err.value.code)
    assert text.startswith(f'error: Refused {path}: ')
    assert re.search(reason, text), text
    assert 'weights_only=False' not in text and 'truncated' not in text


# ----------------------------------------------------------------------------
# another detector's checkpoint, broken files
# ----------------------------------------------------------------------------
def test_another_detectors_checkpoint_is_refused_unless_allowed(
    trained, tmp_path, capsys
):
    foreign = trained['foreign']
    unloaded = '(?s)retinanet.pth leaves \\d+ weight.*--allow-partial'
    with pytest.raises(SystemExit, match=unloaded):
        run_test_tool(trained, tmp_path, 'foreign_test', foreign)
    with pytest.raises(SystemExit, match=unloaded):
        demo(trained, tmp_path, foreign)
    assert export(trained, tmp_path, foreign) == 1
    assert plot(trained, tmp_path, foreign) == 1
    err = capsys.readouterr().err
    assert err.count('retinanet.pth leaves') == 2  # export and plots
    assert 'dyhead_blocks' in err  # the grouped report names what is missing
    # the user's opt-in runs them, the unloaded weights at their init
    run_test_tool(
        trained,
        tmp_path,
        'foreign_allowed',
        foreign,
        '--allow-partial-checkpoint',
    )
    assert (
        export(trained, tmp_path, foreign, '--allow-partial-checkpoint') == 0
    )


@pytest.mark.parametrize(
    'content,what',
    [
        (b'', 'it is empty'),
        (b'<!DOCTYPE html><html>Sign in</html>', 'HTML/XML page'),
    ],
    ids=['empty', 'html'],
)
def test_broken_files_get_the_diagnosis_through_the_test_tool(
    trained, tmp_path, content, what
):
    path = tmp_path / 'model.pth'
    path.write_bytes(content)
    with pytest.raises(SystemExit) as err:
        run_test_tool(trained, tmp_path, f'broken_{len(content)}', str(path))
    text = str(err.value.code)
    assert str(path) in text and what in text and 'Fix:' in text
    assert 'weights_only=False' not in text


# ----------------------------------------------------------------------------
# defect: --resume of a truncated or corrupt last checkpoint ended in torch's
# "failed finding central directory", naming neither file
# ----------------------------------------------------------------------------
def flip_a_tensor_bit(path):
    """Flip one bit inside the largest tensor record of a torch.save zip."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(open(path, 'rb').read())
    lengths = struct.unpack_from('<HH', data, info.header_offset + 26)
    start = info.header_offset + 30 + sum(lengths)
    data[start + info.file_size // 2] ^= 0x10
    open(path, 'wb').write(bytes(data))


def work_dir_with_last_checkpoint(trained, tmp_path, damage):
    """A work_dir as tools/train.py leaves it: an intact iter_2.pth, and
    iter_4.pth (``damage``: 'truncated', 'flipped bit' or None) named in
    last_checkpoint."""
    work = tmp_path / 'work'
    work.mkdir()
    good, last = work / 'iter_2.pth', work / 'iter_4.pth'
    shutil.copy(trained['ckpt'], good)
    shutil.copy(trained['ckpt'], last)
    if damage == 'truncated':
        data = last.read_bytes()
        last.write_bytes(data[: len(data) * 2 // 3])
    elif damage == 'flipped bit':
        flip_a_tensor_bit(last)
    os.utime(good, (1e9, 1e9))  # saved before iter_4.pth
    (work / 'last_checkpoint').write_text(str(last))
    return work, good, last


def train_script(script, trained, work):
    return subprocess.run(
        [sys.executable, script, trained['config'], '--work-dir', str(work)]
        + ['--resume'],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize('damage', ['truncated', 'flipped bit'])
def test_resume_from_a_broken_last_checkpoint_names_the_intact_one(
    trained, tmp_path, damage
):
    work, good, last = work_dir_with_last_checkpoint(trained, tmp_path, damage)
    before = sorted(os.listdir(work))
    out = train_script('tools/train.py', trained, work)
    assert out.returncode == 1, out.stderr[-3000:]
    err = out.stderr
    assert f'cannot resume from {last}' in err
    assert f'named in {work}/last_checkpoint' in err
    assert f'iter_2.pth is intact: pass --resume {good}' in err
    what = 'truncated or corrupt zip' if damage == 'truncated' else 'CRC-32'
    assert what in err
    assert 'central directory' not in err
    # refused before mmengine started: no run, nothing chosen for the user
    assert sorted(os.listdir(work)) == before
    assert (work / 'last_checkpoint').read_text() == str(last)


def test_resume_from_an_intact_checkpoint_still_runs_and_mmdet_is_as_it_was(
    trained, tmp_path
):
    work, _, last = work_dir_with_last_checkpoint(trained, tmp_path, None)
    out = train_script('tools/train.py', trained, work)
    assert out.returncode == 0, out.stderr[-3000:]
    # mmengine's note (the config logs warnings only) that it resumed
    assert 'Advance dataloader 2 steps' in out.stdout
    # mmdet's own train.py (the package imported by the config's
    # custom_imports) still ends in torch's error: nothing was patched
    shutil.rmtree(work)
    work, _, _ = work_dir_with_last_checkpoint(trained, tmp_path, 'truncated')
    from mmdet_dyhead.cli.mmdet_tools import mmdet_tool_path

    out = train_script(mmdet_tool_path('train.py'), trained, work)
    assert out.returncode != 0
    assert 'central directory' in out.stderr
    assert 'is intact' not in out.stderr
