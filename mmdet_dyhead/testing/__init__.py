"""Built-in synthetic COCO-format data for the quickstart, tests and demos.

A deterministic detection set drawn from scratch (no download), like
``mmdet.testing`` holds mmdet's test helpers; not a dataset class.
"""

from .synthetic_coco import (
    META_FILE,
    SYNTHETIC_CLASSES,
    generate_synthetic_coco,
    read_synthetic_meta,
)
from .tiny_configs import mmdet_config_path, shrink_model, tiny_detector_cfg

__all__ = [
    'SYNTHETIC_CLASSES',
    'META_FILE',
    'generate_synthetic_coco',
    'read_synthetic_meta',
    'mmdet_config_path',
    'shrink_model',
    'tiny_detector_cfg',
]
