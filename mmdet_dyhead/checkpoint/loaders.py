"""The one loader, and the scope in which mmengine uses it.

:func:`load` reads a local path, an http(s) URL or a ``dyhead://`` name,
always weights-only. mmengine's own loaders for local paths and URLs do not
pass ``weights_only``: ``torch.load`` then follows the environment
(``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns the check off), and
``torch.hub.load_state_dict_from_url``, which mmengine's http loader calls,
defaults to ``weights_only=False``. :func:`checkpoint_loaders` puts
:func:`load` in their place for a ``with`` block: the package's tools run
inside it, so ``load_from``, ``--resume``, ``init_cfg`` ``Pretrained``, the
test checkpoint and ``DetInferencer(weights=...)`` read through it.
Importing the package does not do this.
"""

import contextlib
from typing import Iterator

from .files import fetch, read_file
from .zoo import SCHEME, load_from_dyhead

# mmengine's prefixes that the scope takes over ('' is every local path).
PREFIXES = ('', 'http://', 'https://')


def load(filename: str, map_location=None) -> object:
    """Read a checkpoint weights-only, with the package's diagnosis.

    Args:
        filename (str): Local path, http(s) URL (downloaded once into
            torch.hub's cache, checked to be a torch checkpoint before it
            gets its name there) or ``dyhead://<model name>``.
        map_location: As in :func:`torch.load`.

    Raises:
        FileNotFoundError: No such local file.
        CheckpointError: The file is not a checkpoint, is broken, or names
            Python objects that a weights-only load refuses.
    """
    if filename.startswith(SCHEME):
        return load_from_dyhead(filename, map_location)
    if filename.startswith(('http://', 'https://')):
        return read_file(fetch(filename), map_location)
    return read_file(filename, map_location)


def load_from_weights_only(filename: str, map_location=None, **kwargs):
    """:func:`load` with the signature of mmengine's loaders (``model_dir``
    and ``progress`` of its http loader are accepted and not used)."""
    return load(filename, map_location)


@contextlib.contextmanager
def checkpoint_loaders() -> Iterator[None]:
    """Within the block, mmengine reads local and http(s) checkpoints with
    :func:`load`; its own loaders are back when the block ends.

    Covers ``CheckpointLoader``'s ``''``, ``http://`` and ``https://``
    prefixes and the module function ``load_from_http`` that its
    ``torchvision://``, ``open-mmlab://`` and ``mmcls://`` loaders call.
    """
    from mmengine.runner import checkpoint as mmengine_checkpoint

    loader = mmengine_checkpoint.CheckpointLoader
    saved = {prefix: loader._schemes[prefix] for prefix in PREFIXES}
    saved_http = mmengine_checkpoint.load_from_http
    loader.register_scheme(list(PREFIXES), load_from_weights_only, force=True)
    mmengine_checkpoint.load_from_http = load_from_weights_only
    try:
        yield
    finally:
        mmengine_checkpoint.load_from_http = saved_http
        for prefix, function in saved.items():
            loader.register_scheme(prefix, function, force=True)
