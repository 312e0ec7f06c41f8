"""Checked checkpoint files: what the package's loader reads, refuses and
reports.

Beside DyHead models, a plain mmdet RetinaNet shows that mmengine's own
loading is what it is without the package outside
``checkpoint_loaders()``, and the package's loader inside it.
"""

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.registry import init_default_scope
from mmengine.runner.checkpoint import CheckpointLoader
from mmengine.runner.checkpoint import load_checkpoint as mmengine_load

from mmdet_dyhead.checkpoint import (
    CheckpointError,
    CheckpointHashError,
    CheckpointKeyError,
    checkpoint_loaders,
    load,
    load_checkpoint,
    load_state_dict,
    sha256_of,
)
from mmdet_dyhead.checkpoint import files as files_module
from mmdet_dyhead.checkpoint import zoo as zoo_module
from projects.synthetic_coco import mmdet_config_path, shrink_model


def plain_retinanet():
    """mmdet's own RetinaNet config, shrunk; no DyHead, no custom_imports."""
    from mmdet.registry import MODELS
    from mmengine.config import Config

    init_default_scope('mmdet')
    cfg = Config.fromfile(
        mmdet_config_path('retinanet/retinanet_r50_fpn_1x_coco.py')
    )
    assert 'custom_imports' not in cfg
    shrink_model(cfg.model)
    return MODELS.build(cfg.model)


@pytest.fixture
def retinanet_file(tmp_path):
    model = plain_retinanet()
    for p in model.parameters():  # differ from any fresh init
        nn.init.normal_(p, std=0.05)
    path = tmp_path / 'trained.pth'
    torch.save({'meta': {}, 'state_dict': model.state_dict()}, path)
    return model, path


# ----------------------------------------------------------------------------
# defect: a hex suffix in a file name is not a published hash
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    'name', ['model-20240517.pth', 'epoch_12-deadbeef.pth']
)
def test_own_checkpoints_with_hex_like_names_load(retinanet_file, name):
    trained, path = retinanet_file
    renamed = path.with_name(name)
    os.rename(path, renamed)
    for load_into in (mmengine_load, load_checkpoint):
        target = plain_retinanet()
        load_into(target, str(renamed))
        for key, value in trained.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), (
                load_into,
                key,
            )


# ----------------------------------------------------------------------------
# defect: files that are not checkpoints are named, payloads are refused
# ----------------------------------------------------------------------------
NOT_CHECKPOINTS = {
    'lfs.pth': (
        b'version https://git-lfs.github.com/spec/v1\noid sha256:'
        b'4d7a\nsize 132\n',
        'git-LFS pointer',
    ),
    'notfound.pth': (
        b'404: Not Found',
        "text or unknown file starting with '404: Not Found'",
    ),
    'meta.pth': (b'{"state_dict": {}}', 'JSON'),
    'bom.pth': (
        b'\xef\xbb\xbf<!DOCTYPE html><html>Sign in</html>',
        'HTML/XML page',
    ),
    'empty.pth': (b'', 'empty'),
}


@pytest.mark.parametrize('name', sorted(NOT_CHECKPOINTS))
def test_files_that_are_not_checkpoints_are_named(tmp_path, name):
    content, what = NOT_CHECKPOINTS[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load(str(path))
    assert what in str(err.value)
    assert 'weights_only=False' not in str(err.value)


def test_numpy_file_and_truncated_checkpoint_are_named(
    tmp_path, retinanet_file
):
    np.save(tmp_path / 'array.npy', np.zeros(3))
    with pytest.raises(CheckpointError, match='numpy .npy array'):
        load(str(tmp_path / 'array.npy'))
    data = retinanet_file[1].read_bytes()
    (tmp_path / 'cut.pth').write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated or corrupt zip'):
        load(str(tmp_path / 'cut.pth'))


class _Payload:
    def __reduce__(self):
        return (os.system, ('echo pwned',))


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_a_code_running_payload_is_named_and_refused(tmp_path, legacy):
    path = tmp_path / 'evil.pth'
    torch.save(
        {'state_dict': {}, 'x': _Payload()},
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    with pytest.raises(CheckpointError) as err:
        load(str(path))
    text = str(err.value)
    assert f'{os.system.__module__}.system' in text
    assert 'runs commands or code' in text
    assert 'weights_only=False' in text and 'do not load it' in text


def test_a_plain_pickle_is_named_not_unpickled(tmp_path):
    path = tmp_path / 'plain.pth'
    with open(path, 'wb') as f:
        pickle.dump({'x': _Payload()}, f, protocol=4)
    with pytest.raises(CheckpointError, match='plain Python pickle'):
        load(str(path))


def test_outside_the_scope_mmengine_loads_as_it_ships(tmp_path):
    """mmengine's own loader raises its own (torch's) error for a foreign
    file: importing the package replaces nothing."""
    path = tmp_path / 'lfs.pth'
    path.write_bytes(NOT_CHECKPOINTS['lfs.pth'][0])
    with pytest.raises(Exception) as err:
        mmengine_load(plain_retinanet(), str(path))
    assert not isinstance(err.value, CheckpointError)


def test_the_scope_routes_mmengine_through_the_loader_and_restores_it(
    tmp_path,
):
    from mmengine.runner import checkpoint as mmengine_checkpoint

    path = tmp_path / 'lfs.pth'
    path.write_bytes(NOT_CHECKPOINTS['lfs.pth'][0])
    http_before = mmengine_checkpoint.load_from_http
    with checkpoint_loaders():
        with pytest.raises(CheckpointError, match='git-LFS pointer'):
            mmengine_load(plain_retinanet(), str(path))
        assert mmengine_checkpoint.load_from_http is not http_before
    assert mmengine_checkpoint.load_from_http is http_before
    with pytest.raises(Exception) as err:  # mmengine's own loader again
        mmengine_load(plain_retinanet(), str(path))
    assert not isinstance(err.value, CheckpointError)


class _TouchPayload:
    """Creates ``marker`` when unpickled (through the named callable)."""

    def __init__(self, how, marker):
        self.how, self.marker = how, str(marker)

    def __reduce__(self):
        if self.how == 'os.system':
            return (os.system, (f'touch {self.marker}',))
        import time
        import timeit

        stmt = f'open({self.marker!r}, "w").close()'
        return (timeit.timeit, (stmt, 'pass', time.perf_counter, 1))


@pytest.mark.parametrize('how', ['os.system', 'timeit.timeit'])
def test_code_running_payloads_never_run_and_are_not_called_harmless(
    tmp_path, how, http_root, monkeypatch
):
    www, base, _ = http_root
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    marker = tmp_path / 'ran'
    torch.save(
        {'state_dict': {}, 'x': _TouchPayload(how, marker)}, www / 'e.pth'
    )
    # the payload is live: an unsafe load runs it
    torch.load(www / 'e.pth', weights_only=False)
    assert marker.exists()
    marker.unlink()
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    for source in (str(www / 'e.pth'), f'{base}/e.pth'):
        with pytest.raises(CheckpointError) as err:
            load(source)
        text = str(err.value)
        named = how.replace('os.', f'{os.system.__module__}.')
        assert named in text and 'e.pth' in text
        assert 'can run code' in text or 'runs commands or code' in text
        assert 'harmless' not in text
        with checkpoint_loaders(), pytest.raises(CheckpointError):
            CheckpointLoader.load_checkpoint(source)
    assert not marker.exists()


# ----------------------------------------------------------------------------
# dyhead:// and downloads
# ----------------------------------------------------------------------------
def test_zoo_names_resolve_to_url_and_the_hash_it_is_published_with():
    from torch.hub import HASH_REGEX

    zoo = zoo_module.zoo_weights()
    assert 'atss_r50_fpn_dyhead-6b_1x_coco' in zoo
    for name, (url, sha) in zoo.items():
        assert url.startswith('https://'), name
        assert HASH_REGEX.search(url.rsplit('/', 1)[-1]).group(1) == sha
        assert zoo_module.resolve_zoo_name(f'dyhead://{name}') == (url, sha)
    with pytest.raises(CheckpointError, match='not in the model zoo'):
        zoo_module.resolve_zoo_name('dyhead://atss_r50_typo')


@pytest.fixture
def served_zoo(http_root, tmp_path, monkeypatch, retinanet_file):
    """A zoo of one model on a loopback server; an empty torch.hub cache."""
    www, base, seen = http_root
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    _, path = retinanet_file
    good = f'retinanet-{sha256_of(str(path))[:8]}.pth'
    os.rename(path, www / good)
    zoo = {'tiny': (f'{base}/{good}', good[-12:-4])}
    monkeypatch.setattr(zoo_module, 'zoo_weights', lambda: zoo)
    return www, base, seen, zoo


def cache_files():
    folder = files_module.default_cache_dir()
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_dyhead_scheme_downloads_checks_caches_and_loads(
    served_zoo, retinanet_file
):
    www, base, seen, zoo = served_zoo
    trained, _ = retinanet_file
    target = plain_retinanet()
    # mmengine's loader (what load_from and init_cfg use) with the new prefix
    mmengine_load(target, 'dyhead://tiny', strict=True)
    torch.testing.assert_close(target.state_dict(), trained.state_dict())
    assert cache_files() == [zoo['tiny'][0].rsplit('/', 1)[-1]]
    assert len(seen) == 1
    CheckpointLoader.load_checkpoint('dyhead://tiny')  # from the cache
    assert len(seen) == 1


def test_a_download_that_is_not_the_published_file_is_not_cached(
    served_zoo, monkeypatch
):
    www, base, seen, zoo = served_zoo
    url, sha = zoo['tiny']
    # the server now sends another file under the same name
    torch.save({'state_dict': {'w': torch.ones(1)}}, www / url.split('/')[-1])
    with pytest.raises(CheckpointHashError, match='nothing was cached'):
        CheckpointLoader.load_checkpoint('dyhead://tiny')
    assert cache_files() == []


@pytest.mark.parametrize(
    'content',
    [
        b'<!DOCTYPE html><html>Please sign in</html>',
        'truncated',
    ],
)
def test_login_pages_and_cut_downloads_never_reach_the_cache(
    served_zoo, content, retinanet_file
):
    www, base, seen, _ = served_zoo
    if content == 'truncated':
        data = (www / os.listdir(www)[0]).read_bytes()
        content = data[: len(data) // 3]
    (www / 'nohash.pth').write_bytes(content)
    with pytest.raises(CheckpointError, match='Nothing was cached'):
        files_module.download_checkpoint(f'{base}/nohash.pth')
    assert cache_files() == []
    # a later run downloads again instead of reusing a bad file
    with pytest.raises(CheckpointError, match='Nothing was cached'):
        files_module.download_checkpoint(f'{base}/nohash.pth')
    assert [p for p in seen if p == '/nohash.pth'] == ['/nohash.pth'] * 2


def test_a_damaged_cached_copy_is_refused_with_the_fix(served_zoo):
    _, _, _, zoo = served_zoo
    CheckpointLoader.load_checkpoint('dyhead://tiny')
    cached = os.path.join(files_module.default_cache_dir(), cache_files()[0])
    with open(cached, 'ab') as f:
        f.write(b'tampered')
    with pytest.raises(CheckpointHashError, match=f'delete {cached}'):
        CheckpointLoader.load_checkpoint('dyhead://tiny')


# ----------------------------------------------------------------------------
# defect: the key report
# ----------------------------------------------------------------------------
def test_shape_mismatch_is_listed_once_and_raised_only_when_strict():
    model, other = plain_retinanet(), plain_retinanet()
    state = dict(other.state_dict())
    state['bbox_head.retina_cls.weight'] = torch.zeros(7, 32, 3, 3)
    report = load_state_dict(model, state, strict=False)
    assert [k for k, _, _ in report.mismatched] == [
        'bbox_head.retina_cls.weight'
    ]
    assert report.missing == [] and report.unexpected == []
    assert (
        'bbox_head.retina_cls.weight'
        not in report.format().split('shape mismatch')[0]
    )
    with pytest.raises(
        CheckpointKeyError, match='checkpoint \\(7, 32, 3, 3\\)'
    ):
        load_state_dict(model, state, strict=True)


def test_mmdet_named_keys_of_another_width_are_reported_not_crashed():
    from mmdet.models.necks import DyHead

    from mmdet_dyhead.models import DyHeadNeck

    theirs = DyHead(16, 16, num_blocks=2)  # mmdet's neck, other width
    ours = DyHeadNeck(32, 32, num_blocks=2, dcn_backend='torch')
    report = load_state_dict(ours, theirs.state_dict(), strict=False)
    assert report.mismatched and not report.unexpected
    mismatched = {k for k, _, _ in report.mismatched}
    assert 'dyhead_blocks.0.spatial_attn.offset_conv.weight' in mismatched
    assert not mismatched & set(report.missing)
    with pytest.raises(CheckpointKeyError):
        load_state_dict(ours, theirs.state_dict(), strict=True)
    # the same width loads exactly, through the same names
    same = DyHead(32, 32, num_blocks=2)
    assert load_state_dict(ours, same.state_dict(), strict=True).ok
