"""mmdet-dyhead registers into mmdet's own registries (scope ``mmdet``).

Configs that inherit ``mmdet::`` files keep ``default_scope='mmdet'``, so
every mmdet type and every type of this package resolve without prefixes.
Only names mmdet does not use are registered (see ``docs/user_guide.md``).
The one exception to mmdet's registries is the CPU DDP wrapper, which goes
into mmengine's root ``MODEL_WRAPPERS`` (see :mod:`.engine.cpu_ddp`).

Configs inherited as ``_base_ = 'mmdet_dyhead::<path>'`` get
``_scope_='mmdet_dyhead'`` on the dicts they introduce (mmengine stamps the
package name of an external base). For those, each of mmdet's registries
has an empty child of scope ``mmdet_dyhead`` (``SCOPED_REGISTRIES``): a type
looked up there is found in mmdet's registry or mmengine's root, exactly as
under scope ``mmdet``. mmengine resolves ``<package>::`` only for the
packages in its ``MODULE2PACKAGE`` table, to which this module adds its own
name (an entry for this package only; the others are left as they are).
"""

import mmdet.registry as mmdet_registry
from mmdet.registry import HOOKS, MODELS, OPTIM_WRAPPERS
from mmengine.config.utils import MODULE2PACKAGE
from mmengine.registry import Registry

SCOPE = 'mmdet_dyhead'
MODULE2PACKAGE.setdefault(SCOPE, 'mmdet-dyhead')

# Each child imports its parent's lazy locations (mmdet.models, ...) on first
# use, as a lookup in mmdet's registry itself would.
SCOPED_REGISTRIES = {
    name: Registry(
        registry.name,
        parent=registry,
        scope=SCOPE,
        locations=list(getattr(registry, '_locations', [])),
    )
    for name, registry in sorted(vars(mmdet_registry).items())
    if isinstance(registry, Registry) and registry.scope == 'mmdet'
}

__all__ = ['HOOKS', 'MODELS', 'OPTIM_WRAPPERS', 'SCOPE', 'SCOPED_REGISTRIES']
