"""mmengine's other checkpoint prefixes, for the package's one loader.

mmengine's ``CheckpointLoader`` knows more prefixes than local paths and
http(s) URLs. Those that name a model resolve, through mmengine's own
tables, to a URL or a local file, which the package's loader then reads
weights-only:

- ``open-mmlab://NAME``, ``openmmlab://NAME``: mmengine's
  ``hub/openmmlab.json`` updated by ``$MMENGINE_HOME/open_mmlab.json``
  (a value that is not a URL is a path under ``$MMENGINE_HOME``);
- ``torchvision://NAME``, ``modelzoo://NAME``: torchvision's weight URLs;
- ``mmcls://NAME``: mmengine's ``hub/mmcls.json`` (the backbone keys are
  taken as mmengine does).

Every other ``<scheme>://`` (``pavi://``, ``s3://``, ``petrel://``, and
prefixes other packages register) is refused: mmengine's loaders for them
call ``torch.load`` without ``weights_only``.
"""

import logging
import os.path as osp
import re
from typing import Tuple

from .files import CheckpointError

OPENMMLAB = ('open-mmlab://', 'openmmlab://')
TORCHVISION = ('torchvision://', 'modelzoo://')
MMCLS = 'mmcls://'
NAMED = OPENMMLAB + TORCHVISION + (MMCLS,)
# '<scheme>://' and mmengine's '<client>:s3://' form
SCHEME = re.compile(r'^[A-Za-z][\w.+-]*(:[A-Za-z][\w.+-]*)?://')


def named_prefix(filename: str) -> str:
    """The prefix of ``filename`` among :data:`NAMED`, or ``''``."""
    return next((p for p in NAMED if filename.startswith(p)), '')


def _table(prefix: str, filename: str) -> Tuple[dict, str]:
    """mmengine's ``{name: URL or path}`` for ``prefix``, and where it is
    read from (for messages)."""
    from mmengine.runner import checkpoint as mmengine_checkpoint

    if prefix in OPENMMLAB:
        home = mmengine_checkpoint._get_mmengine_home()
        where = (
            f"mmengine's hub/openmmlab.json and "
            f'{osp.join(home, "open_mmlab.json")}'
        )
        return mmengine_checkpoint.get_external_models(), where
    if prefix in TORCHVISION:
        try:
            return (
                mmengine_checkpoint.get_torchvision_models(),
                "torchvision's weights",
            )
        except ImportError as err:
            raise CheckpointError(
                f'{filename}: {prefix} names are looked up in torchvision, '
                f'which is not installed ({err}). Fix: pip install '
                f'torchvision, or give the URL of the weights.'
            ) from err
    return mmengine_checkpoint.get_mmcls_models(), "mmengine's hub/mmcls.json"


def resolve_named(filename: str) -> str:
    """The URL or local path a named prefix stands for, as mmengine resolves
    it (deprecated open-mmlab names included).

    Args:
        filename (str): e.g. ``open-mmlab://resnet50_v1c``.

    Raises:
        CheckpointError: An unknown name.
    """
    from mmengine.logging import print_log
    from mmengine.runner import checkpoint as mmengine_checkpoint

    prefix = named_prefix(filename)
    name = filename[len(prefix) :]
    table, where = _table(prefix, filename)
    if prefix in OPENMMLAB:
        renamed = mmengine_checkpoint.get_deprecated_model_names()
        if name in renamed:
            print_log(
                f'{prefix}{name} is deprecated in favor of '
                f'{prefix}{renamed[name]}',
                logger='current',
                level=logging.WARNING,
            )
            name = renamed[name]
    target = table.get(name)
    if not isinstance(target, str) or not target:
        raise CheckpointError(
            f'{filename}: no model {name!r} in {where}. Fix: check the name, '
            f'or give a local path or URL.'
        )
    if prefix in OPENMMLAB and not target.startswith(('http://', 'https://')):
        target = osp.join(mmengine_checkpoint._get_mmengine_home(), target)
    return target


def from_mmcls(checkpoint) -> dict:
    """The backbone weights of an mmcls checkpoint, as mmengine takes
    them."""
    from mmengine.runner.checkpoint import _process_mmcls_checkpoint

    return _process_mmcls_checkpoint(checkpoint)


def refuse_other_scheme(filename: str) -> None:
    """Raise for a ``<scheme>://`` that no branch of the loader reads.

    Raises:
        CheckpointError: ``filename`` starts with such a prefix.
    """
    match = SCHEME.match(filename)
    if match is None:
        return
    raise CheckpointError(
        f'Refused {filename}: the prefix {match.group(0)} is not read by this '
        f"package's weights-only loader (mmengine's loader for it calls "
        f'torch.load without weights_only). It reads local paths, http(s) '
        f'URLs, dyhead://, and {", ".join(NAMED)} names. Fix: copy the file '
        f"to local disk with its storage's own client and give the local "
        f'path.'
    )
