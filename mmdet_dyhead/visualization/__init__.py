"""Attention visualisation (paper Figures 3 and 4).

See docs/visualization.md and tools/visualize_attention.py.
"""

from .collectors import AttentionRecorder, find_layers, resolve_layer
from .plots import (
    activation_map,
    plot_feature_stages,
    plot_scale_ratio_histograms,
)

__all__ = [
    'AttentionRecorder',
    'find_layers',
    'resolve_layer',
    'activation_map',
    'plot_feature_stages',
    'plot_scale_ratio_histograms',
]
