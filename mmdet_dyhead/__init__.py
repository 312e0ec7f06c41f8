"""mmdet-dyhead: Dynamic Head (CVPR 2021) for MMDetection 3.x.

Importing the package (configs do it through ``custom_imports``) registers
its modules in mmdet's registries under names mmdet does not use, the
``dyhead://`` checkpoint scheme in mmengine's ``CheckpointLoader`` and the
``mmdet_dyhead::`` config scope (:mod:`.registry`). Nothing else in the
process changes; each extra behaviour is opt-in (see
``docs/user_guide.md``, "What importing does").
"""

from . import (
    checkpoint,  # noqa: F401  (dyhead://, CheckpointFitHook)
    engine,  # noqa: F401  (hook, optimizer and model wrappers)
    models,  # noqa: F401  (DyHeadNeck, TaskAttnBBoxHead)
)
from .version import __version__

__all__ = ['__version__']
