"""tools/zoo.py: list, fetch and place zoo weights, for offline machines too.

The zoo is replaced by files served on a loopback HTTP server (the
``http_root`` fixture) and torch.hub's cache by a folder under tmp_path;
what lands in the cache is compared with the served bytes and with hashlib's
sha256, and then loaded through ``dyhead://`` as a config's ``load_from``
would.
"""

import hashlib
import os
import os.path as osp
import re
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from mmengine.runner.checkpoint import CheckpointLoader

from mmdet_dyhead.checkpoint import CheckpointHashError
from mmdet_dyhead.checkpoint import zoo as zoo_module
from mmdet_dyhead.cli import zoo as tool
from tests.helpers import REPO_ROOT


def save_weights(path, value):
    torch.save(
        {'meta': {}, 'state_dict': {'w': torch.full((3,), value)}}, path
    )
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()


@pytest.fixture
def zoo(http_root, tmp_path, monkeypatch):
    """Two zoo models served on loopback; an empty cache under tmp_path.

    Yields ``(zoo dict, {name: served file}, requested paths, cache dir)``.
    """
    www, base, seen = http_root
    served, entries = {}, {}
    for name, value in (('tiny', 1.0), ('other', 2.0)):
        tmp = www / 'tmp.pth'
        digest = save_weights(tmp, value)
        file_name = f'{name}_20240101-{digest[:8]}.pth'
        os.rename(tmp, www / file_name)
        served[name] = www / file_name
        entries[name] = (f'{base}/{file_name}', digest[:8])
    monkeypatch.setattr(zoo_module, 'zoo_weights', lambda: dict(entries))
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    cache = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    yield entries, served, seen, cache


def run(capsys, *argv):
    code = tool.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def listed(stdout):
    """``{name: {field: value}}`` from ``list``'s output."""
    models, current = {}, None
    for line in stdout.splitlines():
        if re.fullmatch(r'\S+', line):
            current = models.setdefault(line, {})
        elif current is not None and line.startswith('  '):
            key, value = line.strip().split(None, 1)
            current[key] = value
    return models


def load_tiny():
    return CheckpointLoader.load_checkpoint('dyhead://tiny')['state_dict']


# ----------------------------------------------------------------------------
# list
# ----------------------------------------------------------------------------
def test_list_names_url_hash_cache_file_and_its_state(zoo, capsys):
    entries, served, seen, cache = zoo
    code, out, _ = run(capsys, 'list')
    assert code == 0
    models = listed(out)
    assert sorted(models) == ['other', 'tiny']
    for name, (url, sha) in entries.items():
        assert models[name]['url'] == url
        assert models[name]['sha256'] == f'{sha}...'
        assert models[name]['file'] == str(cache / url.rsplit('/', 1)[-1])
        assert models[name]['status'] == 'missing'
    # one good copy, one damaged one
    cache.mkdir(parents=True)
    (cache / served['tiny'].name).write_bytes(served['tiny'].read_bytes())
    (cache / served['other'].name).write_bytes(
        served['other'].read_bytes()[:100]
    )
    models = listed(run(capsys, 'list')[1])
    assert models['tiny']['status'] == 'ok (sha256 matches)'
    assert models['other']['status'].startswith('INVALID')
    assert entries['other'][1] in models['other']['status']
    assert seen == []  # listing never downloads


# ----------------------------------------------------------------------------
# fetch
# ----------------------------------------------------------------------------
def test_fetch_downloads_the_checked_file_that_dyhead_then_loads(zoo, capsys):
    entries, served, seen, cache = zoo
    code, out, _ = run(capsys, 'fetch', 'tiny')
    assert code == 0
    cached = cache / served['tiny'].name
    assert str(cached) in out
    assert cached.read_bytes() == served['tiny'].read_bytes()
    assert (
        hashlib.sha256(cached.read_bytes())
        .hexdigest()
        .startswith(entries['tiny'][1])
    )
    assert os.listdir(cache) == [cached.name]  # no temporary file left
    assert len(seen) == 1
    torch.testing.assert_close(load_tiny()['w'], torch.full((3,), 1.0))
    assert run(capsys, 'fetch', 'tiny')[0] == 0
    assert len(seen) == 1  # from the cache, no second download


def test_fetch_without_network_says_what_to_run_instead(
    zoo, capsys, monkeypatch
):
    entries, served, seen, cache = zoo
    with socket.socket() as s:  # a port nothing listens on
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    url = f'http://127.0.0.1:{port}/{served["tiny"].name}'
    monkeypatch.setattr(
        zoo_module,
        'zoo_weights',
        lambda: {'tiny': (url, entries['tiny'][1])},
    )
    code, _, err = run(capsys, 'fetch', 'tiny')
    assert code == 1
    assert f'Could not download {url}' in err
    assert 'python tools/zoo.py place tiny <file>' in err
    assert not cache.exists() or os.listdir(cache) == []


def test_fetch_of_an_unknown_name_lists_the_zoo(zoo, capsys):
    code, _, err = run(capsys, 'fetch', 'tiny_typo')
    assert code == 1
    assert 'dyhead://tiny_typo is not in the model zoo' in err
    assert "['other', 'tiny']" in err


# ----------------------------------------------------------------------------
# place
# ----------------------------------------------------------------------------
def test_place_puts_a_file_from_elsewhere_under_the_published_name(
    zoo, capsys, tmp_path
):
    entries, served, seen, cache = zoo
    downloaded = tmp_path / 'Downloads' / 'weights (1).pth'
    downloaded.parent.mkdir()
    downloaded.write_bytes(served['tiny'].read_bytes())
    code, out, _ = run(capsys, 'place', 'tiny', str(downloaded))
    assert code == 0
    assert "load_from = 'dyhead://tiny'" in out
    cached = cache / entries['tiny'][0].rsplit('/', 1)[-1]
    assert os.listdir(cache) == [cached.name]
    assert (
        hashlib.sha256(cached.read_bytes())
        .hexdigest()
        .startswith(entries['tiny'][1])
    )
    assert downloaded.is_file()  # copied, not moved
    torch.testing.assert_close(load_tiny()['w'], torch.full((3,), 1.0))
    assert seen == []  # loaded without any download
    # placing the cached file itself is a no-op
    assert run(capsys, 'place', 'tiny', str(cached))[0] == 0
    assert os.listdir(cache) == [cached.name]


@pytest.mark.parametrize('kind', ['other model', 'html page', 'truncated'])
def test_place_refuses_a_file_that_is_not_the_published_one(
    zoo, capsys, tmp_path, kind
):
    entries, served, seen, cache = zoo
    wrong = tmp_path / 'wrong.pth'
    if kind == 'other model':
        wrong.write_bytes(served['other'].read_bytes())
    elif kind == 'html page':
        wrong.write_bytes(b'<!DOCTYPE html><html>Sign in</html>')
    else:
        wrong.write_bytes(served['tiny'].read_bytes()[:200])
    actual = hashlib.sha256(wrong.read_bytes()).hexdigest()
    code, _, err = run(capsys, 'place', 'tiny', str(wrong))
    assert code == 1
    assert f'its sha256 starts with {actual[:8]}' in err
    assert f'published with {entries["tiny"][1]}' in err
    assert 'Nothing was placed' in err and entries['tiny'][0] in err
    if kind == 'html page':
        assert 'HTML' in err
    if kind == 'truncated':
        assert 'truncated' in err
    assert not cache.exists() or os.listdir(cache) == []


def test_place_replaces_a_damaged_cached_copy(zoo, capsys, tmp_path):
    entries, served, seen, cache = zoo
    cache.mkdir(parents=True)
    cached = cache / served['tiny'].name
    cached.write_bytes(b'\0' * 64)
    with pytest.raises(CheckpointHashError, match=f'delete {cached}'):
        load_tiny()
    code, out, _ = run(capsys, 'place', 'tiny', str(served['tiny']))
    assert code == 0 and 'replaced' in out
    assert cached.read_bytes() == served['tiny'].read_bytes()
    torch.testing.assert_close(load_tiny()['w'], torch.full((3,), 1.0))
    assert seen == []


def test_place_of_a_missing_file_or_unknown_name_fails_clearly(
    zoo, capsys, tmp_path
):
    code, _, err = run(capsys, 'place', 'tiny', str(tmp_path / 'none.pth'))
    assert code == 1 and 'none.pth is not a file' in err
    code, _, err = run(capsys, 'place', 'nope', str(tmp_path))
    assert code == 1 and 'not in the model zoo' in err


# ----------------------------------------------------------------------------
# the thin tool against the real zoo
# ----------------------------------------------------------------------------
def test_tools_zoo_list_shows_the_metafiles_weights(tmp_path):
    index = yaml.safe_load(open(osp.join(REPO_ROOT, 'model-index.yml')))
    weights = {}
    for rel in index['Import']:
        for m in yaml.safe_load(open(osp.join(REPO_ROOT, rel)))['Models']:
            if 'Weights' in m:
                weights[m['Name']] = m['Weights']
    env = dict(os.environ, TORCH_HOME=str(tmp_path))
    out = subprocess.run(
        [sys.executable, osp.join(REPO_ROOT, 'tools', 'zoo.py'), 'list'],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    models = listed(out.stdout)
    assert sorted(models) == sorted(weights)
    for name, url in weights.items():
        assert models[name]['url'] == url
        assert models[name]['file'] == osp.join(
            str(tmp_path), 'hub', 'checkpoints', url.rsplit('/', 1)[-1]
        )
        assert models[name]['status'] == 'missing'
