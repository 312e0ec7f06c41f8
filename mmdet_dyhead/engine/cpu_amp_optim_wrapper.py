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

A step whose gradients hold NaN or inf is skipped, never applied: the
wrapper logs a warning with the running count, and stops training with an
error once ``max_nonfinite_steps`` steps in a row were non-finite (see
:class:`CPUAmpOptimWrapper`). Without loss scaling (bfloat16's default)
nothing else would notice: ``GradScaler`` checks gradients only when it
scales, so a NaN would otherwise go into the weights, and the run would end
with exit status 0 and empty detections. The forward passes of a skipped
step have already updated the model's buffers (BatchNorm running
statistics, with NaN when the activations were); the wrapper puts them
back, so a checkpoint never holds what a skipped step computed.
"""

import contextlib
import logging
import math
from typing import Dict, List, Optional, Union

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
        max_nonfinite_steps (int, optional): Consecutive optimizer steps
            with a non-finite gradient after which training stops with a
            ``FloatingPointError``. Default 10. Each such step is skipped
            (the weights and the optimizer state stay as they were; with
            dynamic loss scaling the scaler also lowers its scale) and
            logged as a warning; a finite step resets the run. None never
            stops (skipping and warnings stay). The buffers a skipped
            step's forward passes changed (BatchNorm ``running_mean``,
            ``running_var``, ``num_batches_tracked``) are restored too:
            :meth:`optim_context`, which mmengine's ``train_step`` enters
            around the forward, copies the model's buffers before the
            first forward of each optimizer step.
        **kwargs: As for ``OptimWrapper`` (``optimizer``, ``clip_grad``,
            ``accumulative_counts``).
    """

    def __init__(
        self,
        loss_scale: Union[str, float, dict, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        use_fsdp: bool = False,
        max_nonfinite_steps: Optional[int] = 10,
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
        if max_nonfinite_steps is not None and (
            isinstance(max_nonfinite_steps, bool)
            or not isinstance(max_nonfinite_steps, int)
            or max_nonfinite_steps < 1
        ):
            raise ValueError(
                'optim_wrapper.max_nonfinite_steps must be a whole number '
                f'>= 1 or None, got {max_nonfinite_steps!r}.'
            )
        # AmpOptimWrapper.__init__ asserts a GPU; OptimWrapper's is the rest.
        OptimWrapper.__init__(self, **kwargs)
        self.max_nonfinite_steps = max_nonfinite_steps
        # Steps skipped for a non-finite gradient: all, and the current run.
        self.nonfinite_steps = 0
        self.consecutive_nonfinite_steps = 0
        self.cast_dtype = dtype
        # The model and its buffers as they were before the first forward
        # of the current step (accumulated forwards included).
        self._buffers_before_step = None
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

    def step(self, **kwargs) -> None:
        """``AmpOptimWrapper.step`` that never applies a non-finite gradient.

        The finiteness check reads the gradients before anything changes
        them: the total norm that gradient clipping uses (and logs as
        ``grad_norm``), computed once. Clipping after the check would hide
        an infinite norm: ``clip_grad_norm_`` scales every gradient by
        ``max_norm / inf = 0``, so finite gradients whose squares overflow
        float32 come out as zeros, which look finite and would still move
        the weights through momentum and weight decay.

        A skipped step calls neither the optimizer nor the scaler's
        ``step``: weights, optimizer state (momentum, Adam's step count)
        stay as they were, and so do the model's buffers (copied by
        :meth:`optim_context` before the step's first forward). With
        dynamic loss scaling the scale is lowered by the scaler's backoff
        factor, as ``GradScaler`` does for a step it skips itself.

        Args:
            kwargs: Keyword arguments for :meth:`torch.optim.Optimizer.step`.
        """
        before, self._buffers_before_step = self._buffers_before_step, None
        scaling = self.loss_scaler.is_enabled()
        if self.clip_grad_kwargs:
            self.loss_scaler.unscale_(self.optimizer)
        params = self._params_with_grad()
        clip_by_norm = bool(self.clip_grad_kwargs) and (
            self.grad_name == 'grad_norm'
        )
        if clip_by_norm:
            norm_type = self.clip_grad_kwargs.get('norm_type', 2.0)
            foreach = self.clip_grad_kwargs.get('foreach')
        else:
            norm_type, foreach = 2.0, None
        total_norm = torch.nn.utils.get_total_norm(
            [p.grad for p in params], norm_type, foreach=foreach
        )
        norm = float(total_norm) if params else 0.0
        if clip_by_norm and params:
            # What mmengine's OptimWrapper logs when it clips.
            self.message_hub.update_scalar('train/grad_norm', norm)
        if not math.isfinite(norm):
            if before is not None:
                _restore_buffers(*before)
            self._skip_nonfinite_step(norm)
            if scaling:
                backoff = self.loss_scaler.get_backoff_factor()
                self.loss_scaler.update(
                    self._scale_update_param
                    or self.loss_scaler.get_scale() * backoff
                )
            return
        self.consecutive_nonfinite_steps = 0
        if self.clip_grad_kwargs and params:
            if clip_by_norm:
                torch.nn.utils.clip_grads_with_norm_(
                    params,
                    self.clip_grad_kwargs['max_norm'],
                    total_norm,
                    foreach=foreach,
                )
            else:
                self._clip_grad()
        self.loss_scaler.step(self.optimizer, **kwargs)
        self.loss_scaler.update(self._scale_update_param)

    def _params_with_grad(self) -> List[torch.Tensor]:
        """The parameters mmengine's ``_clip_grad`` clips."""
        return [
            p
            for group in self.optimizer.param_groups
            for p in group['params']
            if p.requires_grad and p.grad is not None
        ]

    def _skip_nonfinite_step(self, norm: float) -> None:
        self.nonfinite_steps += 1
        self.consecutive_nonfinite_steps += 1
        run = self.consecutive_nonfinite_steps
        scaling = self.loss_scaler.is_enabled()
        action = 'step skipped, weights and buffers unchanged'
        if scaling:
            action += f', loss scale {self.loss_scaler.get_scale():g} lowered'
        print_log(
            f'CPUAmpOptimWrapper: gradient norm is {norm} under '
            f'{self.cast_dtype} autocast; {action} ({run} in a row, '
            f'{self.nonfinite_steps} in total).',
            logger='current',
            level=logging.WARNING,
        )
        if self.max_nonfinite_steps is not None and (
            run >= self.max_nonfinite_steps
        ):
            scale = (
                f', loss scale {self.loss_scaler.get_scale():g}'
                if scaling
                else ''
            )
            raise FloatingPointError(
                f'CPUAmpOptimWrapper: the gradients were non-finite (norm '
                f'{norm}) in {run} consecutive steps under {self.cast_dtype} '
                f'autocast{scale}; none of them was applied. Train the same '
                'config without --amp (float32): if it stays finite, this '
                'model needs float32 on CPU; if not, lower the learning '
                'rate or set optim_wrapper.clip_grad. '
                'optim_wrapper.max_nonfinite_steps sets how many '
                'consecutive skipped steps are tolerated (None: no limit).'
            )

    @contextlib.contextmanager
    def optim_context(self, model: nn.Module):
        """Gradient-accumulation context of ``OptimWrapper`` + CPU autocast.

        Also copies ``model``'s buffers when no forward of the current
        optimizer step has run yet, so that :meth:`step` can put them back
        if it skips the step. mmengine's ``train_step`` enters this
        context around the data preprocessor and the forward, and the
        model it passes (a DDP wrapper too) holds every buffer the forward
        changes.
        """
        if self._buffers_before_step is None:
            self._buffers_before_step = (model, _copy_buffers(model))
        with OptimWrapper.optim_context(self, model):
            with torch.autocast('cpu', dtype=self.cast_dtype):
                yield


def _copy_buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    """A copy of every buffer of ``model``, by name."""
    with torch.no_grad():
        return {
            name: buf.detach().clone() for name, buf in model.named_buffers()
        }


def _restore_buffers(model: nn.Module, saved: Dict[str, torch.Tensor]) -> None:
    """Write ``saved`` (:func:`_copy_buffers`) back into ``model``."""
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in saved:
                buf.copy_(saved[name])
