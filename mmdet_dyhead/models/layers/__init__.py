from .dyhead_block import DyHeadBlock
from .hard_sigmoid import build_hard_sigmoid
from .scale_attention import ScaleAwareAttention
from .spatial_attention import DeformConvNorm, SpatialAwareAttention
from .task_attention import TaskAwareAttention

__all__ = [
    'DyHeadBlock', 'DeformConvNorm', 'ScaleAwareAttention',
    'SpatialAwareAttention', 'TaskAwareAttention', 'build_hard_sigmoid'
]
