from .dynamic_head_block import BlockAttention, DynamicHeadBlock
from .hard_sigmoid import build_hard_sigmoid
from .scale_attention import ScaleAwareAttention
from .spatial_attention import DeformConvNorm, SpatialAwareAttention
from .task_attention import TaskAwareAttention

__all__ = [
    'BlockAttention',
    'DynamicHeadBlock',
    'DeformConvNorm',
    'ScaleAwareAttention',
    'SpatialAwareAttention',
    'TaskAwareAttention',
    'build_hard_sigmoid',
]
