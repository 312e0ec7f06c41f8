"""``dyhead://<model name>``: zoo weights by name, checked against the sha256
prefix published in the model index.

Registered in mmengine's ``CheckpointLoader`` on import (a new prefix; no
existing scheme changes)::

    load_from = 'dyhead://atss_r50_fpn_dyhead-6b_1x_coco'

The file is downloaded into torch.hub's cache only once complete and
checked, re-checked when taken from the cache, and read weights-only.
"""

import os.path as osp
from typing import Dict, Tuple
from urllib.parse import urlparse

from mmengine.runner.checkpoint import CheckpointLoader

from .files import CheckpointError, default_cache_dir, fetch, read_file

SCHEME = 'dyhead://'


def _mim_root() -> str:
    """Where model-index.yml lives: the wheel's .mim/ or the repository."""
    package = osp.dirname(osp.dirname(osp.abspath(__file__)))
    shipped = osp.join(package, '.mim')
    if osp.isfile(osp.join(shipped, 'model-index.yml')):
        return shipped
    return osp.dirname(package)


def zoo_weights() -> Dict[str, Tuple[str, str]]:
    """``{model name: (weights URL, sha256 prefix)}`` from the model index,
    for every zoo entry that has weights."""
    import yaml

    root = _mim_root()
    with open(osp.join(root, 'model-index.yml')) as f:
        index = yaml.safe_load(f)
    entries = {}
    for metafile in index.get('Import', []):
        with open(osp.join(root, metafile)) as f:
            meta = yaml.safe_load(f) or {}
        for model in meta.get('Models', []):
            url = model.get('Weights')
            if url:
                sha = str(
                    model.get('Metadata', {}).get('Weights SHA256 Prefix', '')
                )
                entries[model['Name']] = (url, sha)
    return entries


def resolve_zoo_name(filename: str) -> Tuple[str, str]:
    """``dyhead://<name>`` (or ``<name>``) -> ``(url, sha256 prefix)``.

    Raises:
        CheckpointError: Unknown name, or an entry without a hash.
    """
    name = filename[len(SCHEME) :] if filename.startswith(SCHEME) else filename
    zoo = zoo_weights()
    if name not in zoo:
        raise CheckpointError(
            f'{SCHEME}{name} is not in the model zoo. Models with weights: '
            f'{sorted(zoo)} (see docs/model_zoo.md).'
        )
    url, sha = zoo[name]
    if not sha:
        raise CheckpointError(
            f'{SCHEME}{name} has no published sha256 in '
            f'its metafile; refusing an unchecked file.'
        )
    return url, sha


def zoo_cache_path(name: str) -> str:
    """Where the weights of zoo model ``name`` belong on this machine:
    torch.hub's cache, under the file name of the weights URL.

    Args:
        name (str): A model name of the zoo, or ``dyhead://<name>``.
    """
    url, _ = resolve_zoo_name(name)
    return osp.join(default_cache_dir(), osp.basename(urlparse(url).path))


def load_from_dyhead(filename: str, map_location=None) -> object:
    """mmengine scheme loader for ``dyhead://<model name>``.

    Args:
        filename (str): ``dyhead://<model name>``.
        map_location: As in :func:`torch.load`.
    """
    return read_file(fetch(*resolve_zoo_name(filename)), map_location)


CheckpointLoader.register_scheme(SCHEME, load_from_dyhead)
