"""Let mmengine's ``--launcher pytorch`` train on CPU (gloo), unchanged otherwise.

mmengine 0.10.x assumes an accelerator in two places of its distributed
path: ``_init_dist_pytorch`` calls ``torch.cuda.set_device`` (CPU builds of
torch have no CUDA at all) and ``Runner.wrap_model`` passes
``device_ids=[LOCAL_RANK]`` to DDP, which torch rejects for CPU modules.
:func:`enable_cpu_distributed` fixes both, and only when no CUDA device
exists, so GPU runs keep mmengine's exact code path. ``torchrun`` stays the
launcher; nothing else is replaced.
"""
import os

import torch

_ENABLED = False


def _accelerator_available() -> bool:
    from mmengine.device import (is_cuda_available, is_mlu_available,
                                 is_musa_available, is_npu_available)
    return (is_cuda_available() or is_npu_available() or is_mlu_available()
            or is_musa_available())


def _init_dist_pytorch_cpu(backend, init_backend='torch', **kwargs) -> None:
    """mmengine's ``_init_dist_pytorch`` minus the device binding.

    Args:
        backend (str): ``torch.distributed`` backend; must be ``'gloo'``
            (or ``'mpi'``) on CPU.
        init_backend (str): Only ``'torch'`` is supported on CPU.
        **kwargs: Passed to ``init_process_group`` (e.g. ``timeout``).
    """
    import torch.distributed as torch_dist
    if backend == 'nccl':
        raise RuntimeError(
            "env_cfg.dist_cfg.backend='nccl' needs CUDA GPUs, and none is "
            'available. Train on CPU with the gloo backend: add '
            '--cfg-options env_cfg.dist_cfg.backend=gloo (see '
            'docs/distributed.md).')
    if init_backend != 'torch':
        raise RuntimeError(f"init_backend={init_backend!r} is not supported "
                           f"on CPU; use env_cfg.dist_cfg.init_backend='torch'.")
    torch_dist.init_process_group(
        backend=backend, rank=int(os.environ['RANK']),
        world_size=int(os.environ['WORLD_SIZE']), **kwargs)


def _cpu_ddp_class():
    from mmengine.model import MMDistributedDataParallel

    class CPUDistributedDataParallel(MMDistributedDataParallel):
        """MMDistributedDataParallel that drops ``device_ids`` for CPU modules.

        torch's DDP requires ``device_ids=None`` when the module lives on
        the CPU; mmengine always passes the local rank.
        """

        def __init__(self, module, device_ids=None, **kwargs):
            on_cpu = all(p.device.type == 'cpu' for p in module.parameters())
            super().__init__(module=module,
                             device_ids=None if on_cpu else device_ids,
                             **kwargs)

    return CPUDistributedDataParallel


def enable_cpu_distributed() -> bool:
    """Patch mmengine's launcher path for CPU-only machines (idempotent).

    Returns:
        bool: True if the CPU path is active (no accelerator present),
        False if mmengine's own path was left untouched.
    """
    global _ENABLED
    if _ENABLED:
        return True
    if _accelerator_available() or not torch.distributed.is_available():
        return False
    import mmengine.dist.utils as dist_utils
    import mmengine.runner.runner as runner_module
    dist_utils._init_dist_pytorch = _init_dist_pytorch_cpu
    # Runner.wrap_model looks the class up in its module namespace.
    runner_module.MMDistributedDataParallel = _cpu_ddp_class()
    _ENABLED = True
    return True


enable_cpu_distributed()
