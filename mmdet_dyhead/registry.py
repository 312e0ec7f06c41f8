"""mmdet-dyhead registers into mmdet's own registries (scope ``mmdet``).

Configs that inherit ``mmdet::`` files keep ``default_scope='mmdet'``, so
every mmdet type and every type of this package resolve without prefixes.
Only names mmdet does not use are registered (see ``docs/user_guide.md``).
The one exception to mmdet's registries is the CPU DDP wrapper, which goes
into mmengine's root ``MODEL_WRAPPERS`` (see :mod:`.engine.cpu_ddp`).
"""

from mmdet.registry import HOOKS, MODELS, OPTIM_WRAPPERS

__all__ = ['HOOKS', 'MODELS', 'OPTIM_WRAPPERS']
