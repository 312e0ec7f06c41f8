"""``import mmdet_dyhead`` registers the package's modules and nothing else.

A fresh interpreter imports what the package itself imports (torch, mmcv,
mmengine, mmdet), records every module attribute, every class attribute,
every registry and torch's weights-only allow-list, imports the package, and
compares. Only new, package-owned names may appear (the DCN operators of the
``mmdet_dyhead::`` torch.library namespace included).
"""

import subprocess
import sys

from tests.helpers import subprocess_env

SNAPSHOT_AND_COMPARE = r"""
import sys
import torch
import mmcv.ops
import mmdet.apis, mmdet.engine, mmdet.models, mmdet.registry
import mmengine.analysis, mmengine.dist, mmengine.hooks, mmengine.model
import mmengine.optim, mmengine.runner
from mmengine.registry import Registry

ROOTS = ('torch', 'mmcv', 'mmengine', 'mmdet')
MISSING = object()


def ours(key, value):
    owner = getattr(value, '__module__', '') or ''
    # The DCN operators in the package's torch.library namespace (torch
    # keeps a table of operator names).
    operator = isinstance(value, str) and value.startswith('mmdet_dyhead::')
    return (
        'dyhead' in str(key).lower()
        or owner.startswith('mmdet_dyhead')
        or operator
    )


def owners():
    for name, module in list(sys.modules.items()):
        if module is None or name.split('.')[0] not in ROOTS:
            continue
        yield name, module
        for attr, value in list(vars(module).items()):
            if isinstance(value, type) and value.__module__ == name:
                yield f'{name}.{attr}', value


def snapshot():
    attrs, registries = {}, {}
    for owner, obj in owners():
        for attr, value in list(vars(obj).items()):
            if attr in ('__warningregistry__', '__dict__', '__weakref__'):
                continue
            attrs[(owner, attr)] = (
                obj, value, dict(value) if isinstance(value, dict) else None)
            if isinstance(value, Registry):
                registries[id(value)] = (f'{owner}.{attr}', value,
                                         dict(value.module_dict),
                                         value.build_func)
    return attrs, registries, list(torch.serialization.get_safe_globals())


attrs, registries, safe = snapshot()
import mmdet_dyhead  # noqa: E402
changes = []
for (owner, attr), (obj, value, content) in attrs.items():
    now = vars(obj).get(attr, MISSING)
    if content is None:
        if now is not value:
            changes.append(f'{owner}.{attr} replaced')
        continue
    if not isinstance(now, dict):
        changes.append(f'{owner}.{attr} replaced by {type(now)}')
        continue
    for key, old in content.items():
        if now.get(key, MISSING) is not old:
            changes.append(f'{owner}.{attr}[{key!r}] changed or removed')
    for key in set(now) - set(content):
        if not ours(key, now[key]):
            changes.append(f'{owner}.{attr}[{key!r}] added')
for name, registry, entries, build_func in registries.values():
    if registry.build_func is not build_func:
        changes.append(f'{name}.build_func replaced')
    now = registry.module_dict
    for key, cls in entries.items():
        if now.get(key) is not cls:
            changes.append(f'{name}[{key!r}] changed')
    for key in set(now) - set(entries):
        if not ours(key, now[key]):
            changes.append(f'{name}[{key!r}] added: {now[key]}')
if list(torch.serialization.get_safe_globals()) != safe:
    changes.append('torch weights-only safe globals changed')
print('\n'.join(changes) if changes else 'unchanged')
"""


def test_import_changes_nothing_but_adds_package_names():
    out = subprocess.run(
        [sys.executable, '-c', SNAPSHOT_AND_COMPARE],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == 'unchanged', out.stdout


def test_the_check_sees_a_global_change():
    """The comparison above fails for each kind of change the package once
    made (guards the guard)."""
    patches = [
        'from mmengine.runner import checkpoint as c; '
        'c.load_state_dict = lambda *a, **k: None',
        'from mmengine.runner.checkpoint import CheckpointLoader as L; '
        "L.register_scheme('', lambda *a: None, force=True)",
        'from mmengine.registry import MODELS; '
        'MODELS.build_func = lambda *a, **k: None',
        'from mmengine.registry import OPTIM_WRAPPERS as W; '
        "W.register_module(name='AmpOptimWrapper', module=type('X', (), {}),"
        ' force=True)',
        'from mmengine.analysis import complexity_analysis as c; '
        "c._DEFAULT_SUPPORTED_FLOP_OPS['prim::PythonOp.X'] = None",
        'import torch; torch.serialization.add_safe_globals([print])',
    ]
    for patch in patches:
        code = SNAPSHOT_AND_COMPARE.replace(
            'import mmdet_dyhead  # noqa: E402',
            f'import mmdet_dyhead  # noqa: E402\n{patch}',
        )
        out = subprocess.run(
            [sys.executable, '-c', code],
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip() != 'unchanged', patch


def test_registered_names_are_new_to_mmdet():
    """The package registers only what configs build, under names that no
    mmdet class uses (mmdet has DyHead and DyHeadBlock)."""
    import inspect

    import mmdet.models  # noqa: F401
    from mmdet.registry import HOOKS, MODELS, OPTIM_WRAPPERS
    from mmdet.utils import register_all_modules
    from mmengine.registry import MODEL_WRAPPERS

    register_all_modules()
    ours = {}
    for registry in (MODELS, HOOKS, OPTIM_WRAPPERS, MODEL_WRAPPERS):
        ours.update(
            {
                name: cls
                for name, cls in registry.module_dict.items()
                if cls.__module__.startswith('mmdet_dyhead')
            }
        )
    assert sorted(ours) == [
        'CPUAmpOptimWrapper',
        'CPUDistributedDataParallel',
        'CheckpointFitHook',
        'DyHeadATSSHead',
        'DyHeadCheckHook',
        'DyHeadNeck',
        'TaskAttnBBoxHead',
    ]
    mmdet_classes = {
        name
        for mod_name, mod in list(sys.modules.items())
        if mod_name.startswith('mmdet.') and mod is not None
        for name, obj in vars(mod).items()
        if inspect.isclass(obj)
        and getattr(obj, '__module__', '').startswith('mmdet.')
    }
    assert 'DyHeadBlock' in mmdet_classes and 'DyHead' in mmdet_classes
    assert not set(ours) & mmdet_classes
    assert MODELS.get('DyHead').__module__ == 'mmdet.models.necks.dyhead'
