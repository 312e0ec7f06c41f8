"""mmdet-dyhead: Dynamic Head (CVPR 2021) for MMDetection 3.x.

Importing the package registers every module in mmdet's registries and
allow-lists the classes mmengine stores in its checkpoints for torch's
``weights_only`` loader (see :mod:`mmdet_dyhead.utils.safe_load`).
"""
from .version import __version__
from .utils.safe_load import register_mmengine_safe_globals

register_mmengine_safe_globals()

from . import models  # noqa: E402,F401  (registers the modules)
from .utils import flops  # noqa: E402,F401  (DCN FLOP rules for mmengine's analyzer)

__all__ = ['__version__', 'register_mmengine_safe_globals']
