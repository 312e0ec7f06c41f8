from .dyhead_neck import DYHEAD_PRESETS, DyHeadNeck

__all__ = ['DYHEAD_PRESETS', 'DyHeadNeck']
