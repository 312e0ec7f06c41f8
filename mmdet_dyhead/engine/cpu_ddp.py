"""Multi-process training on CPU-only machines (``torchrun`` + gloo).

mmengine 0.10.x assumes an accelerator in two places of its distributed
path: ``_init_dist_pytorch`` calls ``torch.cuda.set_device`` (CPU builds of
torch have no CUDA) and ``Runner.wrap_model`` passes
``device_ids=[LOCAL_RANK]`` to DDP, which torch rejects for CPU modules.
Neither is replaced here. Instead:

- :func:`init_cpu_process_group` starts the process group itself (what the
  package's ``tools/train.py``/``tools/test.py`` do under ``--launcher
  pytorch`` without an accelerator); mmengine's Runner then finds it started
  and skips its own initialisation;
- :class:`CPUDistributedDataParallel` is a model wrapper under its own name
  (``model_wrapper_cfg=dict(type='CPUDistributedDataParallel')``) that drops
  ``device_ids`` for modules on the CPU.
"""

import os
from typing import Optional

from mmengine.device import (
    is_cuda_available,
    is_mlu_available,
    is_musa_available,
    is_npu_available,
)
from mmengine.model import MMDistributedDataParallel

# Runner.wrap_model looks the wrapper type up with MODEL_WRAPPERS.get() on
# mmengine's root registry, which does not search scoped children such as
# mmdet's; a plain ``type='CPUDistributedDataParallel'`` must be found there.
from mmengine.registry import MODEL_WRAPPERS

_STARTED = False


def accelerator_available() -> bool:
    """Whether mmengine sees a CUDA, NPU, MLU or MUSA device."""
    return (
        is_cuda_available()
        or is_npu_available()
        or is_mlu_available()
        or is_musa_available()
    )


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` that accepts mmengine's ``device_ids``
    for a module on the CPU (torch requires ``device_ids=None`` there).

    Args:
        module (nn.Module): The model.
        device_ids (list[int], optional): Ignored when every parameter of
            ``module`` is on the CPU, else passed on.
        **kwargs: As for ``MMDistributedDataParallel``.
    """

    def __init__(self, module, device_ids=None, **kwargs):
        on_cpu = all(p.device.type == 'cpu' for p in module.parameters())
        super().__init__(
            module=module, device_ids=None if on_cpu else device_ids, **kwargs
        )


def init_cpu_process_group(
    backend: str = 'gloo', timeout: Optional[int] = None
) -> None:
    """Start torch.distributed from torchrun's environment, on the CPU.

    Args:
        backend (str): ``'gloo'`` (or ``'mpi'``). ``'nccl'`` is refused with
            the setting that fixes it.
        timeout (int, optional): Seconds, as mmengine's ``dist_cfg.timeout``.

    Raises:
        RuntimeError: ``backend='nccl'``, or the torchrun variables are
            missing.
    """
    import datetime

    import torch.distributed as dist

    if backend == 'nccl':
        raise RuntimeError(
            "env_cfg.dist_cfg.backend='nccl' needs CUDA GPUs, and none is "
            'available. Train on CPU with the gloo backend: add '
            '--cfg-options env_cfg.dist_cfg.backend=gloo (see '
            'docs/distributed.md).'
        )
    missing = [
        k
        for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
        if k not in os.environ
    ]
    if missing:
        raise RuntimeError(
            f'--launcher pytorch needs the variables torchrun sets; {missing} '
            f'are not set. Start the tool with torchrun --nproc_per_node=N.'
        )
    kwargs = {}
    if timeout is not None:
        kwargs['timeout'] = datetime.timedelta(seconds=timeout)
    global _STARTED
    dist.init_process_group(
        backend=backend,
        rank=int(os.environ['RANK']),
        world_size=int(os.environ['WORLD_SIZE']),
        **kwargs,
    )
    _STARTED = True


def started_process_group() -> bool:
    """Whether :func:`init_cpu_process_group` started this process's group
    (whoever starts it should destroy it before the interpreter exits)."""
    return _STARTED
