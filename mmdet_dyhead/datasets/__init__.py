"""Built-in data: a synthetic COCO-format detection set (no download)."""
from .synthetic_coco import (META_FILE, SYNTHETIC_CLASSES,
                             generate_synthetic_coco, read_synthetic_meta)

__all__ = ['SYNTHETIC_CLASSES', 'META_FILE', 'generate_synthetic_coco',
           'read_synthetic_meta']
