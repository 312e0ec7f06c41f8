"""mmdet-dyhead registers into mmdet's own registries (scope ``mmdet``).

Configs that inherit ``mmdet::`` files keep ``default_scope='mmdet'``, so
every mmdet type and every type of this package resolve without prefixes.
"""
from mmdet.registry import MODELS

__all__ = ['MODELS']
