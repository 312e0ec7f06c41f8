"""Checkpoint files, key reports, FLOP rules and the weights-only
allow-list.
"""

from .checkpoint import (
    CheckpointError,
    CheckpointHashError,
    describe_non_checkpoint,
    download_checkpoint,
    load_weights_only,
    sha256_of,
)
from .key_report import (
    CheckpointKeyError,
    KeyReport,
    extract_state_dict,
    group_keys,
    load_checkpoint,
    load_state_dict,
    read_checkpoint,
)
from .safe_load import mmengine_checkpoint_globals, mmengine_safe_globals

__all__ = [
    'CheckpointError',
    'CheckpointHashError',
    'CheckpointKeyError',
    'KeyReport',
    'describe_non_checkpoint',
    'download_checkpoint',
    'extract_state_dict',
    'group_keys',
    'load_checkpoint',
    'load_state_dict',
    'load_weights_only',
    'mmengine_checkpoint_globals',
    'mmengine_safe_globals',
    'read_checkpoint',
    'sha256_of',
]
