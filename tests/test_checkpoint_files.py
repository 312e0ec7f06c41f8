"""Checked checkpoint files: what the package's loader reads, refuses and
reports.

Beside DyHead models, a plain mmdet RetinaNet shows that mmengine's own
loading is what it is without the package outside
``checkpoint_loaders()``, and the package's loader inside it.
"""

import contextlib
import http.server
import json
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import struct
import threading
import time
import timeit
import urllib.request
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.registry import init_default_scope
from mmengine.runner.checkpoint import CheckpointLoader
from mmengine.runner.checkpoint import load_checkpoint as mmengine_load

from mmdet_dyhead.checkpoint import (
    CheckpointCorruptError,
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
    path = tmp_path / 'lfs.pth'
    path.write_bytes(NOT_CHECKPOINTS['lfs.pth'][0])
    before = dict(CheckpointLoader._schemes)
    with checkpoint_loaders():
        with pytest.raises(CheckpointError, match='git-LFS pointer'):
            mmengine_load(plain_retinanet(), str(path))
    assert CheckpointLoader._schemes == before
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
# defect: open-mmlab:// (and mmengine's other prefixes) were read with a bare
# torch.load inside the tools' scope
# ----------------------------------------------------------------------------
def scheme_examples(evil, base):
    """A name for every prefix mmengine's CheckpointLoader knows, and what
    the package's loader answers: the code-running file where the prefix
    can reach it, else an unknown name or a storage the loader does not
    read (mmengine's own loaders raise KeyError, ImportError or torch's
    error there, never the package's CheckpointError)."""
    payload = '(?s)Refused .*e.pth.*runs commands or code'
    unread = 'is not read by this package'
    return {
        '': (str(evil), payload),
        'http://': (f'{base}/e.pth', payload),
        'https://': (base.replace('http:', 'https:') + '/e.pth', 'download'),
        'dyhead://': ('dyhead://no_such_model', 'not in the model zoo'),
        'open-mmlab://': ('open-mmlab://evil_local', payload),
        'openmmlab://': ('openmmlab://evil_url', payload),
        'torchvision://': ('torchvision://no_such_model', 'no_such_model'),
        'modelzoo://': ('modelzoo://no_such_model', 'no_such_model'),
        'mmcls://': ('mmcls://no_such_model', "no model 'no_such_model'"),
        'pavi://': ('pavi://project/e.pth', 'prefix pavi:// ' + unread),
        r'(\S+\:)?s3://': ('s3://bucket/e.pth', 'prefix s3:// ' + unread),
        r'(\S+\:)?petrel://': (
            'cluster:petrel://bucket/e.pth',
            'prefix cluster:petrel:// ' + unread,
        ),
    }


def test_every_prefix_mmengine_knows_has_an_example():
    examples = scheme_examples('x.pth', 'http://127.0.0.1:9')
    assert set(CheckpointLoader._schemes) == set(examples), (
        'a new checkpoint prefix: add an example and check that the '
        'loader reads it weights-only or refuses it'
    )
    for prefix, (example, _) in examples.items():
        # mmengine itself routes the example to that prefix's loader
        loader = CheckpointLoader._get_checkpoint_loader(example)
        assert loader is CheckpointLoader._schemes[prefix], prefix


@pytest.fixture
def evil_everywhere(tmp_path, http_root, monkeypatch):
    """A code-running checkpoint as a local file, on a loopback server, and
    in ``$MMENGINE_HOME/open_mmlab.json`` (a local entry and a URL one);
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``."""
    www, base, _ = http_root
    marker = tmp_path / 'ran'
    evil = tmp_path / 'e.pth'
    payload = _TouchPayload('os.system', marker)
    torch.save({'state_dict': {}, 'x': payload}, evil)
    shutil.copy(evil, www / 'e.pth')
    home = tmp_path / 'mmengine_home'
    home.mkdir()
    shutil.copy(evil, home / 'e.pth')
    entries = {'evil_local': 'e.pth', 'evil_url': f'{base}/e.pth'}
    (home / 'open_mmlab.json').write_text(json.dumps(entries))
    monkeypatch.setenv('MMENGINE_HOME', str(home))
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    return scheme_examples(evil, base), marker


@pytest.mark.parametrize(
    'prefix', list(scheme_examples('x', 'http://y')), ids=repr
)
def test_no_prefix_runs_a_checkpoints_code(evil_everywhere, prefix):
    examples, marker = evil_everywhere
    example, answer = examples[prefix]
    with checkpoint_loaders(), pytest.raises(CheckpointError) as err:
        CheckpointLoader.load_checkpoint(example, map_location='cpu')
    assert re.search(answer, str(err.value)), str(err.value)
    assert not marker.exists()
    # the package's own entry answers the same
    with pytest.raises(CheckpointError, match=answer):
        load(example)
    assert not marker.exists()


def test_a_prefix_another_package_registers_is_refused(evil_everywhere):
    examples, marker = evil_everywhere

    def load_from_other(filename, map_location=None):
        return torch.load(filename[len('other://') :], weights_only=False)

    CheckpointLoader.register_scheme('other://', load_from_other)
    try:
        with (
            checkpoint_loaders(),
            pytest.raises(CheckpointError, match='prefix other:// is not'),
        ):
            CheckpointLoader.load_checkpoint('other://' + examples[''][0])
        assert CheckpointLoader._schemes['other://'] is load_from_other
    finally:
        CheckpointLoader._schemes.pop('other://')
    assert not marker.exists()


def _plain_function():
    """A function of no risk: still a call, not data, in a pickle."""


class _Calls:
    def __init__(self, how):
        self.how = how

    def __reduce__(self):
        import argparse
        import builtins

        if self.how == 'timeit.timeit':
            return (timeit.timeit, ('pass', 'pass', time.perf_counter, 1))
        if self.how == 'builtins.eval':
            return (builtins.eval, ('1 + 1',))
        if self.how == 'function':
            return (_plain_function, ())
        return (argparse.Namespace, ())  # a plain data class


@pytest.mark.parametrize(
    'how', ['timeit.timeit', 'builtins.eval', 'function', 'data class']
)
def test_a_call_in_a_pickle_is_told_apart_from_a_plain_data_class(
    tmp_path, how
):
    path = tmp_path / 'x.pth'
    torch.save({'state_dict': {}, 'x': _Calls(how)}, path)
    with pytest.raises(CheckpointError) as err:
        load(str(path))
    text = str(err.value)
    assert str(path) in text
    if how == 'data class':
        assert 'argparse.Namespace' in text and 'data classes' in text
        assert 're-save its weights' in text
        assert 'tries to call' not in text and 'not be trusted' not in text
        return
    name = f'{__name__}._plain_function' if how == 'function' else how
    assert f'tries to call {name}' in text and 'when loaded' in text
    assert 'should not be trusted' in text
    assert 're-save' not in text and 'your own' not in text
    if how == 'function':
        assert 'a function, not data' in text
    else:
        assert f'{how} runs commands or code' in text


# ----------------------------------------------------------------------------
# defect: torch.load does not check the zip's CRC-32
# ----------------------------------------------------------------------------
def flip_bit_in_tensor_data(path):
    """Flip one bit in the middle of the largest tensor record of a
    torch.save zip; returns that record's name."""
    with zipfile.ZipFile(path) as archive:
        info = max(
            (i for i in archive.infolist() if '/data/' in i.filename),
            key=lambda i: i.file_size,
        )
    data = bytearray(path.read_bytes())
    # the local header's name and extra (alignment padding) lengths
    name_len, extra_len = struct.unpack_from(
        '<HH', data, info.header_offset + 26
    )
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return info.filename


def test_a_flipped_bit_in_tensor_data_is_refused_naming_member_and_fix(
    retinanet_file,
):
    trained, path = retinanet_file
    member = flip_bit_in_tensor_data(path)
    # torch itself loads it without a word, with one value changed
    loaded = torch.load(path, weights_only=True)['state_dict']
    changed = [
        k
        for k, v in trained.state_dict().items()
        if not torch.equal(loaded[k], v)
    ]
    assert len(changed) == 1
    with pytest.raises(CheckpointCorruptError) as err:
        load(str(path))
    text = str(err.value)
    assert f'{path} is corrupt' in text and member in text
    assert 'CRC-32' in text and 'download or copy it again' in text
    assert 'previous one' in text
    # mmengine's loader in the package's scope (what the tools run)
    with checkpoint_loaders(), pytest.raises(CheckpointCorruptError):
        mmengine_load(plain_retinanet(), str(path))
    # outside it mmengine's loader is as it ships: importing the package
    # patched nothing, so it loads the flipped bit silently
    target = plain_retinanet()
    mmengine_load(target, str(path))
    assert not torch.equal(
        target.state_dict()[changed[0]], trained.state_dict()[changed[0]]
    )


def test_an_intact_checkpoint_still_loads_in_and_out_of_the_scope(
    retinanet_file,
):
    trained, path = retinanet_file
    assert load(str(path))['state_dict'].keys() == trained.state_dict().keys()
    for scope in (checkpoint_loaders, contextlib.nullcontext):
        target = plain_retinanet()
        with scope():
            mmengine_load(target, str(path), strict=True)
        torch.testing.assert_close(target.state_dict(), trained.state_dict())


def test_a_legacy_file_loads_with_a_note_that_it_cannot_be_checked(
    tmp_path,
):
    path = tmp_path / 'legacy.pth'
    weights = {'w': torch.arange(4.0)}
    torch.save(
        {'state_dict': weights}, path, _use_new_zipfile_serialization=False
    )
    with pytest.warns(UserWarning, match='legacy .non-zip. format') as seen:
        loaded = load(str(path))
    assert 'cannot be checked' in str(seen[0].message)
    assert str(path) in str(seen[0].message)
    torch.testing.assert_close(loaded['state_dict'], weights)


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


def test_a_download_with_a_flipped_bit_is_not_cached(
    http_root, tmp_path, retinanet_file
):
    www, base, _ = http_root
    _, path = retinanet_file
    member = flip_bit_in_tensor_data(path)
    os.rename(path, www / 'flipped.pth')
    cache = tmp_path / 'cache'
    with pytest.raises(CheckpointCorruptError) as err:
        files_module.download_checkpoint(
            f'{base}/flipped.pth', cache_dir=str(cache)
        )
    assert member in str(err.value) and 'Nothing was cached' in str(err.value)
    assert os.listdir(cache) == []


class _StallingHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.www/<name>``; under ``/slow/`` it sends half the
    bytes, under ``/stall/`` only the headers, then waits for
    ``server.release`` (a download in progress, a stalled server)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        data = (self.server.www / self.path.rsplit('/', 1)[-1]).read_bytes()
        half = len(data)
        if self.path.startswith('/slow/'):
            half = len(data) // 2
        elif self.path.startswith('/stall/'):
            half = 0
        self.send_response(200)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data[:half])
            self.wfile.flush()
            if half < len(data):
                self.server.release.wait(120)
                self.wfile.write(data[half:])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client was killed


@pytest.fixture
def stalling_server(tmp_path):
    """``(www folder, base URL, release event)``; ``www/w.pth`` is a 2 MB
    checkpoint."""
    www = tmp_path / 'www_slow'
    www.mkdir()
    torch.save({'state_dict': {'w': torch.randn(512, 1024)}}, www / 'w.pth')
    server = http.server.ThreadingHTTPServer(
        ('127.0.0.1', 0), _StallingHandler
    )
    server.www, server.release = www, threading.Event()
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield (
            www,
            f'http://127.0.0.1:{server.server_address[1]}',
            server.release,
        )
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


def _download_in_child(url, cache_dir):
    """A second process downloading into the same cache (fork: no new
    interpreter, so no import time)."""
    child = multiprocessing.get_context('fork').Process(
        target=files_module.download_checkpoint,
        args=(url,),
        kwargs=dict(cache_dir=str(cache_dir)),
    )
    child.start()
    deadline = time.monotonic() + 60
    # wait until half the bytes are on disk
    while time.monotonic() < deadline:
        sizes = (
            [
                p.stat().st_size
                for p in cache_dir.glob('.*.partial.data')
                if p.is_file()
            ]
            if cache_dir.is_dir()
            else []
        )
        if sizes and max(sizes) > 0:
            return child
        time.sleep(0.05)
    child.kill()
    raise AssertionError('the child download never started writing')


def test_an_interrupted_download_leaves_nothing(
    stalling_server, tmp_path, monkeypatch
):
    www, base, _ = stalling_server
    opened = urllib.request.urlopen

    class Interrupted:
        def __init__(self, response):
            self.response, self.reads = response, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.response.close()

        @property
        def headers(self):
            return self.response.headers

        def read(self, size):
            self.reads += 1
            if self.reads == 3:  # Ctrl+C halfway through
                raise KeyboardInterrupt
            return self.response.read(size)

    monkeypatch.setattr(
        urllib.request,
        'urlopen',
        lambda *a, **k: Interrupted(opened(*a, **k)),
    )
    cache = tmp_path / 'cache'
    with pytest.raises(KeyboardInterrupt):
        files_module.download_checkpoint(f'{base}/w.pth', cache_dir=str(cache))
    assert os.listdir(cache) == []


def test_a_stalled_download_fails_in_bounded_time_and_leaves_nothing(
    stalling_server, tmp_path, monkeypatch
):
    www, base, _ = stalling_server
    cache = tmp_path / 'cache'
    url = f'{base}/stall/w.pth'  # headers, then nothing
    started = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        files_module.download_checkpoint(
            url, cache_dir=str(cache), timeout=0.5
        )
    assert time.monotonic() - started < 10
    text = str(err.value)
    assert f'The download of {url} stalled: no data for 0.5 s' in text
    assert 'DYHEAD_DOWNLOAD_TIMEOUT=SECONDS' in text
    assert os.listdir(cache) == []
    # the user's route, the limit from the environment: half a file, then
    # a stall, leaves nothing that a later run would take as complete
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.setenv('DYHEAD_DOWNLOAD_TIMEOUT', '0.5')
    for source in (url, f'{base}/slow/w.pth'):
        started = time.monotonic()
        with pytest.raises(CheckpointError, match='stalled: no data for 0.5'):
            load(source)
        assert time.monotonic() - started < 10
        assert cache_files() == []
    loaded = load(f'{base}/w.pth')
    torch.testing.assert_close(loaded, torch.load(www / 'w.pth'))
    assert cache_files() == ['w.pth']


@pytest.mark.parametrize('value', ['soon', '0', '-1'])
def test_a_bad_download_timeout_is_named(tmp_path, monkeypatch, value):
    monkeypatch.setenv('DYHEAD_DOWNLOAD_TIMEOUT', value)
    with pytest.raises(
        CheckpointError,
        match=f'DYHEAD_DOWNLOAD_TIMEOUT={value} is not a positive number',
    ):
        files_module.download_checkpoint(
            'http://127.0.0.1:9/w.pth', cache_dir=str(tmp_path)
        )


@pytest.mark.parametrize('sig', ['SIGKILL', 'SIGTERM'])
def test_a_killed_downloads_files_are_removed_by_the_next_download(
    stalling_server, tmp_path, sig
):
    www, base, _ = stalling_server
    cache = tmp_path / 'cache'
    child = _download_in_child(f'{base}/slow/w.pth', cache)
    os.kill(child.pid, getattr(signal, sig))
    child.join(30)
    left = sorted(os.listdir(cache))
    assert left and all(n.startswith('.w.pth.') for n in left), left
    path = files_module.download_checkpoint(
        f'{base}/w.pth', cache_dir=str(cache)
    )
    assert os.listdir(cache) == ['w.pth']
    assert open(path, 'rb').read() == (www / 'w.pth').read_bytes()


def test_another_process_download_in_progress_is_left_alone(
    stalling_server, tmp_path
):
    www, base, release = stalling_server
    cache = tmp_path / 'cache'
    child = _download_in_child(f'{base}/slow/w.pth', cache)
    try:
        theirs = sorted(os.listdir(cache))
        # this process downloads the same file meanwhile
        path = files_module.download_checkpoint(
            f'{base}/w.pth', cache_dir=str(cache)
        )
        assert sorted(os.listdir(cache)) == sorted(theirs + ['w.pth'])
        # and a later call (any file) still leaves the live download alone
        assert files_module.remove_abandoned_downloads(str(cache)) == []
        release.set()
        child.join(60)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
    assert os.listdir(cache) == ['w.pth']
    assert open(path, 'rb').read() == (www / 'w.pth').read_bytes()


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
