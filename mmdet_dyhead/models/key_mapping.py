"""Key map between mmdet 3.3's ``DyHead`` blocks and ours.

Block-relative prefixes. One rename (``_rename``) serves every direction: a
checkpoint of mmdet's neck loads into ours (each block renames its keys on
load, :func:`rename_mmdet_keys`), :func:`from_mmdet_keys` converts a whole
state dict and :func:`to_mmdet_keys` writes ours for mmdet.

=================================  ===================================
mmdet ``DyHeadBlock``              mmdet-dyhead ``DynamicHeadBlock``
=================================  ===================================
``spatial_conv_offset.*``          ``spatial_attn.offset_conv.*``
``spatial_conv_high.{conv,norm}``  ``spatial_attn.high_branch.{conv,norm}``
``spatial_conv_mid.{conv,norm}``   ``spatial_attn.mid_branch.{conv,norm}``
``spatial_conv_low.{conv,norm}``   ``spatial_attn.low_branch.{conv,norm}``
``scale_attn_module.1.*``          ``scale_attn.fc.*``
``task_attn_module.conv1.conv.*``  ``task_attn.fc1.*``
``task_attn_module.conv2.conv.*``  ``task_attn.fc2.*``
=================================  ===================================
"""

from collections import OrderedDict
from typing import Dict, Iterable, Tuple

MMDET_TO_OURS: Tuple[Tuple[str, str], ...] = (
    ('spatial_conv_offset.', 'spatial_attn.offset_conv.'),
    ('spatial_conv_high.', 'spatial_attn.high_branch.'),
    ('spatial_conv_mid.', 'spatial_attn.mid_branch.'),
    ('spatial_conv_low.', 'spatial_attn.low_branch.'),
    ('scale_attn_module.1.', 'scale_attn.fc.'),
    ('task_attn_module.conv1.conv.', 'task_attn.fc1.'),
    ('task_attn_module.conv2.conv.', 'task_attn.fc2.'),
)


def _rename(key: str, pairs: Iterable[Tuple[str, str]]) -> str:
    """Rename the first ``old`` block-relative part found in ``key``."""
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old) :]
        marker = '.' + old
        idx = key.find(marker)
        if idx >= 0:
            return key[: idx + 1] + new + key[idx + len(marker) :]
    return key


def from_mmdet_keys(state_dict: Dict) -> 'OrderedDict':
    """mmdet ``DyHead`` key names -> ours (other keys are kept as they are)."""
    return OrderedDict(
        (_rename(k, MMDET_TO_OURS), v) for k, v in state_dict.items()
    )


def rename_mmdet_keys(state_dict: Dict, prefix: str = '') -> int:
    """Rename mmdet ``DyHead`` keys under ``prefix`` to ours, in place.

    What a block does on load (``_load_from_state_dict`` gets the whole
    checkpoint's dict and its own prefix); the same rename as
    :func:`from_mmdet_keys`, applied to the part after ``prefix``.

    Args:
        state_dict (dict): Modified in place; other keys are kept.
        prefix (str): Only keys starting with it are renamed.

    Returns:
        int: How many keys were renamed.
    """
    renamed = 0
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = prefix + _rename(key[len(prefix) :], MMDET_TO_OURS)
        if new != key:
            state_dict[new] = state_dict.pop(key)
            renamed += 1
    return renamed


def to_mmdet_keys(state_dict: Dict) -> 'OrderedDict':
    """Our key names -> mmdet ``DyHead``'s, for loading into mmdet's neck."""
    reverse = tuple((new, old) for old, new in MMDET_TO_OURS)
    return OrderedDict((_rename(k, reverse), v) for k, v in state_dict.items())
