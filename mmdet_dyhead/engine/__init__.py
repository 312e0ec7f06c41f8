"""Training-loop support for mmengine on CPU-only machines.

Both parts change nothing where a CUDA/NPU/MLU/MUSA device exists:
``--launcher pytorch`` with gloo (:mod:`.cpu_distributed`) and ``--amp``
with bfloat16 autocast (:mod:`.cpu_amp`).
"""
from .cpu_amp import enable_cpu_amp
from .cpu_distributed import enable_cpu_distributed

__all__ = ['enable_cpu_amp', 'enable_cpu_distributed']
