"""Mixed-precision training on CPU-only machines (``--amp`` without a GPU).

mmengine 0.10.x refuses to build ``AmpOptimWrapper`` without an accelerator
(an assertion in its constructor), and its ``autocast`` helper allows only
bfloat16 on CPU, although torch's CPU autocast also runs float16 and
``torch.amp.GradScaler('cpu')`` scales losses there. The package's
``tools/train.py --amp`` selects :class:`CPUAmpOptimWrapper` where no
accelerator exists; configs can name it directly::

    optim_wrapper = dict(type='CPUAmpOptimWrapper', dtype='bfloat16',
                         optimizer=dict(type='SGD', lr=0.01))

mmengine's own ``AmpOptimWrapper`` is left as it is.
"""

import contextlib
import logging
from typing import Union

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.optim import AmpOptimWrapper, OptimWrapper

from mmdet_dyhead.registry import OPTIM_WRAPPERS

CPU_AMP_DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16}


def cpu_autocast_supports(dtype: torch.dtype) -> bool:
    """Whether this torch build runs CPU autocast in ``dtype``.

    torch disables CPU autocast with a warning for a dtype it does not
    support; a matmul inside the context tells which one it used.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with torch.autocast('cpu', dtype=dtype):
            probe = torch.ones(1, 1) @ torch.ones(1, 1)
    return probe.dtype == dtype


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(AmpOptimWrapper):
    """``AmpOptimWrapper`` for the CPU: torch CPU autocast + CPU GradScaler.

    A subclass of mmengine's ``AmpOptimWrapper`` (so code that checks for
    AMP recognises it) with the same ``backward``/``step``/``state_dict``;
    only the constructor and the autocast context differ.

    Args:
        loss_scale (str | float | dict, optional): As in mmengine:
            ``'dynamic'``, a static float, or ``GradScaler`` kwargs. Default
            None: dynamic scaling for float16 (whose gradients can
            underflow), none for bfloat16 (float32's exponent range). An
            explicit value is honoured for both dtypes.
        dtype (str | torch.dtype, optional): ``'bfloat16'`` (default) or
            ``'float16'``.
        use_fsdp (bool): Must be False (FSDP needs GPUs).
        **kwargs: As for ``OptimWrapper`` (``optimizer``, ``clip_grad``,
            ``accumulative_counts``).
    """

    def __init__(
        self,
        loss_scale: Union[str, float, dict, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        use_fsdp: bool = False,
        **kwargs,
    ) -> None:
        if use_fsdp:
            raise ValueError(
                'optim_wrapper.use_fsdp=True needs GPUs; remove '
                'it to train on CPU.'
            )
        dtype = self._parse_dtype(dtype)
        if not cpu_autocast_supports(dtype):
            raise ValueError(
                f'torch {torch.__version__} has no CPU autocast for {dtype}. '
                f"Use optim_wrapper.dtype='bfloat16', or train without --amp."
            )
        # AmpOptimWrapper.__init__ asserts a GPU; OptimWrapper's is the rest.
        OptimWrapper.__init__(self, **kwargs)
        self.cast_dtype = dtype
        self._scale_update_param = None
        if loss_scale is None:
            loss_scale = 'dynamic' if dtype == torch.float16 else None
        if loss_scale is None:
            self.loss_scaler = torch.amp.GradScaler('cpu', enabled=False)
        elif loss_scale == 'dynamic':
            self.loss_scaler = torch.amp.GradScaler('cpu')
        elif isinstance(loss_scale, (int, float)):
            self._scale_update_param = float(loss_scale)
            self.loss_scaler = torch.amp.GradScaler(
                'cpu', init_scale=float(loss_scale)
            )
        elif isinstance(loss_scale, dict):
            self.loss_scaler = torch.amp.GradScaler('cpu', **loss_scale)
        else:
            raise TypeError(
                "optim_wrapper.loss_scale must be 'dynamic', a "
                f'number or a dict, got {loss_scale!r}.'
            )
        print_log(
            f'CPUAmpOptimWrapper: CPU autocast in {dtype}, loss scaling '
            f'{"off" if not self.loss_scaler.is_enabled() else loss_scale}.',
            logger='current',
            level=logging.INFO,
        )

    @staticmethod
    def _parse_dtype(dtype) -> torch.dtype:
        if dtype is None:
            return torch.bfloat16
        if isinstance(dtype, str):
            if dtype not in CPU_AMP_DTYPES:
                raise ValueError(
                    f'optim_wrapper.dtype={dtype!r} is not a CPU autocast '
                    f'dtype; choose one of {sorted(CPU_AMP_DTYPES)}.'
                )
            return CPU_AMP_DTYPES[dtype]
        if dtype not in CPU_AMP_DTYPES.values():
            raise ValueError(
                f'optim_wrapper.dtype={dtype} is not a CPU '
                f'autocast dtype; use torch.bfloat16 or '
                f'torch.float16.'
            )
        return dtype

    @contextlib.contextmanager
    def optim_context(self, model: nn.Module):
        """Gradient-accumulation context of ``OptimWrapper`` + CPU autocast."""
        with OptimWrapper.optim_context(self, model):
            with torch.autocast('cpu', dtype=self.cast_dtype):
                yield
