"""Built-in synthetic COCO-format data: the quickstart's, the studies' and
the tests' dataset, drawn from scratch (no download)."""

from .synthetic_coco import (
    META_FILE,
    SYNTHETIC_CLASSES,
    generate_synthetic_coco,
    read_synthetic_meta,
)

__all__ = [
    'META_FILE',
    'SYNTHETIC_CLASSES',
    'generate_synthetic_coco',
    'read_synthetic_meta',
]
