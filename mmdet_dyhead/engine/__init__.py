"""Registered extensions that configs and the package's tools opt into.

- :class:`DyHeadCheckHook` (``custom_hooks``): wiring checks of DyHead
  detectors before they run.
- :class:`CPUAmpOptimWrapper` (``optim_wrapper.type``): ``--amp`` on CPU.
- :class:`CPUDistributedDataParallel` (``model_wrapper_cfg.type``) and
  :func:`init_cpu_process_group`: ``torchrun`` with gloo on CPU.

Importing registers them under these new names; nothing of mmengine's is
replaced.
"""

from .cpu_amp_optim_wrapper import CPUAmpOptimWrapper, cpu_autocast_supports
from .cpu_ddp import (
    CPUDistributedDataParallel,
    accelerator_available,
    init_cpu_process_group,
)
from .dyhead_check_hook import (
    DyHeadCheckHook,
    DyHeadConfigError,
    check_dyhead_detector,
)

__all__ = [
    'CPUAmpOptimWrapper',
    'CPUDistributedDataParallel',
    'DyHeadCheckHook',
    'DyHeadConfigError',
    'accelerator_available',
    'check_dyhead_detector',
    'cpu_autocast_supports',
    'init_cpu_process_group',
]
