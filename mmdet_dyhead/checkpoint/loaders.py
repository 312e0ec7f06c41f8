"""The one loader, and the scope in which mmengine uses it.

:func:`load` reads a local path, an http(s) URL, a ``dyhead://`` name, or a
name of mmengine's other prefixes (``open-mmlab://``, ``torchvision://``,
``mmcls://``, ... resolved by :mod:`.schemes` to a URL or a local file),
always weights-only; any other ``<scheme>://`` is refused. mmengine's own
loaders do not pass ``weights_only``: ``torch.load`` then follows the
environment (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns the check off),
and ``torch.hub.load_state_dict_from_url``, which mmengine's http loader
calls, defaults to ``weights_only=False``. :func:`checkpoint_loaders` puts
:func:`load` in place of every loader mmengine has registered, for a
``with`` block: the package's tools run inside it, so ``load_from``,
``--resume``, ``init_cfg`` ``Pretrained``, the test checkpoint and
``DetInferencer(weights=...)`` read through it, whatever their prefix.
Importing the package does not do this.
"""

import contextlib
from typing import Iterator

from .files import fetch, read_file
from .schemes import (
    MMCLS,
    from_mmcls,
    named_prefix,
    refuse_other_scheme,
    resolve_named,
)
from .zoo import SCHEME, load_from_dyhead


def _read(target: str, map_location) -> object:
    if target.startswith(('http://', 'https://')):
        return read_file(fetch(target), map_location)
    return read_file(target, map_location)


def load(filename: str, map_location=None) -> object:
    """Read a checkpoint weights-only, with the package's diagnosis.

    Args:
        filename (str): Local path, http(s) URL (downloaded once into
            torch.hub's cache, checked to be a torch checkpoint before it
            gets its name there), ``dyhead://<model name>``, or a name of
            ``open-mmlab://``, ``openmmlab://``, ``torchvision://``,
            ``modelzoo://`` or ``mmcls://`` (resolved as mmengine does).
        map_location: As in :func:`torch.load`.

    Raises:
        FileNotFoundError: No such local file.
        CheckpointError: The file is not a checkpoint, is broken, or names
            Python objects that a weights-only load refuses; an unknown
            name; a prefix the loader does not read (``pavi://``,
            ``s3://``, ...).
    """
    if filename.startswith(SCHEME):
        return load_from_dyhead(filename, map_location)
    if filename.startswith(('http://', 'https://')):
        return _read(filename, map_location)
    prefix = named_prefix(filename)
    if prefix:
        checkpoint = _read(resolve_named(filename), map_location)
        return from_mmcls(checkpoint) if prefix == MMCLS else checkpoint
    refuse_other_scheme(filename)
    return read_file(filename, map_location)


def load_from_weights_only(filename: str, map_location=None, **kwargs):
    """:func:`load` with the signature of mmengine's loaders (``model_dir``
    and ``progress`` of its http loader are accepted and not used)."""
    return load(filename, map_location)


@contextlib.contextmanager
def checkpoint_loaders() -> Iterator[None]:
    """Within the block, mmengine reads every checkpoint with :func:`load`;
    its own loaders are back when the block ends.

    Every prefix registered in mmengine's ``CheckpointLoader`` when the
    block starts (``''`` for local paths, ``http://``, ``open-mmlab://``,
    ``s3://``, ..., and those other packages added) is given to
    :func:`load`, which reads it weights-only or refuses it.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    saved = dict(CheckpointLoader._schemes)
    CheckpointLoader.register_scheme(
        list(saved), load_from_weights_only, force=True
    )
    try:
        yield
    finally:
        for prefix, function in saved.items():
            CheckpointLoader.register_scheme(prefix, function, force=True)
