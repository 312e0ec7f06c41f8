"""Built-in synthetic COCO-format data: the quickstart's, the studies' and
the tests' dataset, drawn from scratch (no download), and any detector
config shrunk to train on it in seconds (the tests' one builder of tiny
detectors)."""

from .synthetic_coco import (
    META_FILE,
    SYNTHETIC_CLASSES,
    generate_synthetic_coco,
    read_synthetic_meta,
)
from .tiny_configs import mmdet_config_path, shrink_model, tiny_detector_cfg

__all__ = [
    'META_FILE',
    'SYNTHETIC_CLASSES',
    'generate_synthetic_coco',
    'read_synthetic_meta',
    'mmdet_config_path',
    'shrink_model',
    'tiny_detector_cfg',
]
