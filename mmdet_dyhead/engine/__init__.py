"""Training-loop support code for mmengine (CPU distributed training)."""
from .cpu_distributed import enable_cpu_distributed

__all__ = ['enable_cpu_distributed']
