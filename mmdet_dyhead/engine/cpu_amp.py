"""Let ``tools/train.py --amp`` (mmengine's ``AmpOptimWrapper``) run on CPU.

mmengine 0.10.x refuses to build ``AmpOptimWrapper`` without an accelerator
(an assertion in its constructor), although its ``autocast`` supports CPU
bfloat16. On machines with no CUDA/NPU/MLU/MUSA device,
:func:`enable_cpu_amp` registers :class:`CPUAmpOptimWrapper` under the name
``AmpOptimWrapper`` in mmengine's ``OPTIM_WRAPPERS``: the same wrapper,
bfloat16 autocast, no loss scaling (bfloat16 keeps float32's exponent range,
so gradients do not underflow). Where an accelerator exists nothing changes.
"""
from typing import Union

import torch

_ENABLED = False


def _disabled_grad_scaler():
    try:  # torch >= 2.3
        return torch.amp.GradScaler('cpu', enabled=False)
    except (AttributeError, TypeError):
        return torch.cuda.amp.GradScaler(enabled=False)


def _cpu_amp_class():
    from mmengine.optim import AmpOptimWrapper, OptimWrapper

    class CPUAmpOptimWrapper(AmpOptimWrapper):
        """``AmpOptimWrapper`` for CPU-only machines (bfloat16 autocast).

        Args:
            loss_scale (str | float | dict): Accepted for config
                compatibility and ignored: bfloat16 needs no loss scaling.
            dtype (str | torch.dtype, optional): ``None`` or ``'bfloat16'``
                (CPU autocast has no other dtype).
            use_fsdp (bool): Must be False on CPU.
            **kwargs: As for ``OptimWrapper`` (``optimizer``,
                ``clip_grad``, ``accumulative_counts``).
        """

        def __init__(self, loss_scale: Union[str, float, dict] = 'dynamic',
                     dtype: Union[str, torch.dtype, None] = None,
                     use_fsdp: bool = False, **kwargs) -> None:
            if use_fsdp:
                raise ValueError('optim_wrapper.use_fsdp=True needs GPUs; '
                                 'remove it to train on CPU.')
            if isinstance(dtype, str):
                dtype = getattr(torch, dtype, dtype)
            if dtype not in (None, torch.bfloat16):
                raise ValueError(
                    f'optim_wrapper.dtype={dtype!r}: CPU autocast runs in '
                    f"bfloat16 only. Set optim_wrapper.dtype='bfloat16' (or "
                    f'leave it unset), or train without --amp.')
            OptimWrapper.__init__(self, **kwargs)
            self._scale_update_param = None
            self.loss_scaler = _disabled_grad_scaler()
            self.cast_dtype = dtype

    return CPUAmpOptimWrapper


def enable_cpu_amp() -> bool:
    """Register the CPU ``AmpOptimWrapper`` where no accelerator exists.

    Returns:
        bool: True if the CPU wrapper is registered, False if mmengine's own
        wrapper was left in place.
    """
    global _ENABLED
    if _ENABLED:
        return True
    from .cpu_distributed import _accelerator_available
    if _accelerator_available():
        return False
    from mmengine.registry import OPTIM_WRAPPERS
    OPTIM_WRAPPERS.register_module(name='AmpOptimWrapper',
                                   module=_cpu_amp_class(), force=True)
    _ENABLED = True
    return True


enable_cpu_amp()
