"""mmdet-dyhead: Dynamic Head (CVPR 2021) for MMDetection 3.x.

Importing the package (configs do it through ``custom_imports``):

- registers every module in mmdet's registries;
- allow-lists the classes mmengine stores in its checkpoints for torch's
  ``weights_only`` loader (:mod:`mmdet_dyhead.utils.safe_load`);
- routes mmengine's checkpoint loading through hash-checked, weights-only
  loaders with a grouped key report (:mod:`mmdet_dyhead.utils.checkpoint`);
- lets mmengine's ``--launcher pytorch`` (gloo) and ``--amp`` (bfloat16) run
  on CPU-only machines (:mod:`mmdet_dyhead.engine`; a no-op where an
  accelerator exists).
"""
from .version import __version__
from .utils.safe_load import register_mmengine_safe_globals

register_mmengine_safe_globals()

from .utils.checkpoint import enable_checked_loading  # noqa: E402

enable_checked_loading()

from . import models  # noqa: E402,F401  (registers the modules)
from .utils import flops  # noqa: E402,F401  (DCN FLOP rules for mmengine's analyzer)
from . import engine  # noqa: E402,F401  (CPU paths of --launcher pytorch and --amp)

__all__ = ['__version__', 'register_mmengine_safe_globals']
