from .dyhead_atss_head import DyHeadATSSHead

__all__ = ['DyHeadATSSHead']
