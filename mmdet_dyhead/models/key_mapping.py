"""Key map between mmdet 3.3's ``DyHead`` blocks and ours.

Block-relative prefixes; a checkpoint of mmdet's neck loads into ours (the
blocks convert on load) and :func:`to_mmdet_keys` writes ours for mmdet.

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


def to_mmdet_keys(state_dict: Dict) -> 'OrderedDict':
    """Our key names -> mmdet ``DyHead``'s, for loading into mmdet's neck."""
    reverse = tuple((new, old) for old, new in MMDET_TO_OURS)
    return OrderedDict((_rename(k, reverse), v) for k, v in state_dict.items())


def has_mmdet_keys(state_dict: Dict, prefix: str = '') -> bool:
    """Whether ``state_dict`` holds mmdet-named block keys under ``prefix``."""
    olds = tuple(prefix + old for old, _ in MMDET_TO_OURS)
    return any(k.startswith(olds) for k in state_dict)
