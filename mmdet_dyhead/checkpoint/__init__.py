"""Where a checkpoint is read: one weights-only loader, thin over mmengine
and torch.hub.

- :func:`load`: local path, http(s) URL, ``dyhead://<model name>`` or a
  name of mmengine's ``open-mmlab://``, ``torchvision://``, ``mmcls://``
  prefixes (:mod:`.schemes`; storage prefixes such as ``s3://`` are
  refused), read with ``torch.load(..., weights_only=True)`` inside the
  checked allow-list of mmengine's training-checkpoint classes
  (:func:`mmengine_safe_globals`); a broken, foreign or code-running file,
  or one whose pickle calls allow-listed names with arguments they refuse,
  is named with the reason and the fix, and a zip member whose bytes fail
  their CRC-32 (which torch.load does not check) too.
- :func:`checkpoint_loaders`: a ``with`` block in which mmengine's
  ``CheckpointLoader`` reads every prefix it knows with :func:`load`; the
  package's tools run inside it.
- :func:`load_checkpoint` / :func:`load_weights`: load into a model with a
  grouped :class:`KeyReport`, refusing a checkpoint that leaves model
  weights unloaded unless partial loading is allowed;
  :class:`CheckpointFitHook` does so for a Runner's ``load_from``.
- ``dyhead://`` (:mod:`.zoo`, registered on import as a new prefix) and the
  official-weights converter (:mod:`.convert`).
"""

from .allowlist import (
    finish_load,
    mmengine_checkpoint_globals,
    mmengine_safe_globals,
)
from .files import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointHashError,
    corrupt_member,
    describe_non_checkpoint,
    download_checkpoint,
    global_kind,
    remove_abandoned_downloads,
    sha256_of,
)
from .keys import (
    CheckpointFitHook,
    CheckpointKeyError,
    KeyReport,
    group_keys,
    load_checkpoint,
    load_state_dict,
    load_weights,
)
from .loaders import checkpoint_loaders, load
from .zoo import SCHEME

__all__ = [
    'SCHEME',
    'CheckpointCorruptError',
    'CheckpointError',
    'CheckpointFitHook',
    'CheckpointHashError',
    'CheckpointKeyError',
    'KeyReport',
    'checkpoint_loaders',
    'corrupt_member',
    'describe_non_checkpoint',
    'download_checkpoint',
    'finish_load',
    'global_kind',
    'group_keys',
    'load',
    'load_checkpoint',
    'load_state_dict',
    'load_weights',
    'mmengine_checkpoint_globals',
    'mmengine_safe_globals',
    'remove_abandoned_downloads',
    'sha256_of',
]
