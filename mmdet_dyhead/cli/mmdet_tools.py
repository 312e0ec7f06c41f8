"""Run mmdet's own ``tools/train.py`` and ``tools/test.py`` for this package.

mmdet's scripts run unchanged (``runpy``), with their full command line.
Around them the package's tools do what mmdet's cannot know about, each
step scoped to the tool's process and visible in the log:

- refuse a config that uses this package's types without
  ``custom_imports`` (mmdet's own tools, ``DetInferencer`` and ``mim ...
  mmdet`` would fail on it later with a bare ``KeyError``);
- read every checkpoint (``--resume``, ``load_from``, ``init_cfg``
  ``Pretrained``, the test checkpoint; local or URL) with the package's
  weights-only loader (:func:`~mmdet_dyhead.checkpoint.checkpoint_loaders`),
  and stop with its diagnosis when a file is refused;
- train with ``--resume``: refuse a local resume target (the file
  ``work_dir/last_checkpoint`` names, or the given path) that is truncated,
  not a checkpoint or fails its CRC-32 check, before mmengine reads it,
  naming the newest intact checkpoint beside it to pass instead;
- test: refuse a checkpoint that leaves model weights unloaded
  (:class:`~mmdet_dyhead.checkpoint.CheckpointFitHook`, added as a default
  hook) unless ``--allow-partial-checkpoint`` is given;
- without an accelerator: ``--amp`` selects ``CPUAmpOptimWrapper``, and
  ``--launcher pytorch`` starts a gloo process group and wraps the model in
  ``CPUDistributedDataParallel``.
"""

import argparse
import logging
import os
import os.path as osp
import runpy
import sys
import zipfile
from typing import Iterable, List, Optional, Set, Tuple

PACKAGE = 'mmdet_dyhead'


def mmdet_tool_path(relpath: str) -> str:
    """Path of ``tools/<relpath>`` as shipped in the installed mmdet wheel."""
    import mmdet

    path = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', relpath)
    if not osp.isfile(path):
        raise SystemExit(
            f"mmdet's tools/{relpath} is not at {path}. mmdet must be "
            f'installed from its wheel (pip install mmdet==3.3.0); editable '
            f'mmdet checkouts do not ship .mim/tools.'
        )
    return path


def package_type_names() -> Set[str]:
    """Names this package registered (models, hooks, wrappers)."""
    from mmengine.registry import MODEL_WRAPPERS

    from mmdet_dyhead.registry import HOOKS, MODELS, OPTIM_WRAPPERS

    names = set()
    for registry in (MODELS, HOOKS, OPTIM_WRAPPERS, MODEL_WRAPPERS):
        for name, cls in registry.module_dict.items():
            if cls.__module__.split('.')[0] == PACKAGE:
                names.add(name)
    return names


def _types_in(node) -> Iterable[str]:
    if isinstance(node, dict):
        value = node.get('type')
        if isinstance(value, str):
            yield value.split('.')[-1]
        for child in node.values():
            yield from _types_in(child)
    elif isinstance(node, (list, tuple)):
        for child in node:
            yield from _types_in(child)


def check_custom_imports(cfg, config_file: str) -> None:
    """Refuse a config that builds this package's types but does not import
    the package itself.

    Raises:
        SystemExit: With the line to add.
    """
    imports = (cfg.get('custom_imports') or {}).get('imports', [])
    if isinstance(imports, str):
        imports = [imports]
    if any(m == PACKAGE or m.startswith(PACKAGE + '.') for m in imports):
        return
    used = sorted(set(_types_in(cfg.to_dict())) & package_type_names())
    if used:
        raise SystemExit(
            f'{config_file} uses {", ".join(used)} from {PACKAGE} but does '
            f'not import the package. Add\n'
            f"    custom_imports = dict(imports=['{PACKAGE}'], "
            f'allow_failed_imports=False)\n'
            f"to the config; without it mmdet's tools, DetInferencer and "
            f'mim fail on it with "... is not in the mmdet::model registry".'
        )


def _parse(argv: List[str], train: bool) -> argparse.Namespace:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('config', nargs='?')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    parser.add_argument('--launcher', default='none')
    if train:
        parser.add_argument('--amp', action='store_true')
        parser.add_argument('--work-dir')
        parser.add_argument('--resume', nargs='?', const='auto')
    else:
        parser.add_argument('--allow-partial-checkpoint', action='store_true')
    args, _ = parser.parse_known_args(argv)
    return args


def resume_target(args, cfg) -> Optional[Tuple[str, str]]:
    """The local file mmdet's train.py will resume from, and what named it
    (mmdet's ``--resume`` / ``--work-dir`` rules, then mmengine's
    ``Runner.load_or_resume``); None without resuming or for a URL."""
    work_dir = (
        args.work_dir
        or cfg.get('work_dir')
        or osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    )
    if args.resume == 'auto' or (
        args.resume is None and cfg.get('resume') and not cfg.get('load_from')
    ):
        pointer = osp.join(work_dir, 'last_checkpoint')
        if not osp.isfile(pointer):  # mmengine then trains from scratch
            return None
        with open(pointer) as f:
            return f.read().strip(), f'named in {pointer}'
    target = args.resume or (
        cfg.get('load_from') if cfg.get('resume') else None
    )
    if not target or '://' in target:
        return None
    return target, 'given to resume from'


def _damage(path: str) -> Optional[str]:
    """Why ``path`` cannot be resumed from, or None if it is intact."""
    from mmdet_dyhead.checkpoint import corrupt_member, describe_non_checkpoint

    if not osp.isfile(path):
        return 'it does not exist'
    problem = describe_non_checkpoint(path)
    if problem:
        return problem
    member = corrupt_member(path) if zipfile.is_zipfile(path) else None
    if member:
        return (
            f'its member {member} fails the CRC-32 check stored in the file '
            f'(its bytes changed after they were written)'
        )
    return None


def check_resume_target(args, cfg) -> None:
    """Refuse a broken resume target before mmengine reads it, naming the
    newest intact checkpoint in its folder; nothing else is chosen for the
    user, since resuming from an earlier point repeats training.

    Raises:
        SystemExit: The target is missing, truncated, not a checkpoint or
            fails its CRC-32 check.
    """
    found = resume_target(args, cfg)
    if found is None:
        return
    target, named = found
    problem = _damage(target)
    if problem is None:
        return
    folder = osp.dirname(target) or '.'
    others = [
        osp.join(folder, name)
        for name in (os.listdir(folder) if osp.isdir(folder) else [])
        if name.endswith('.pth') and osp.join(folder, name) != target
    ]
    others.sort(key=osp.getmtime, reverse=True)
    intact = next((p for p in others if _damage(p) is None), None)
    if intact:
        fix = (
            f'{osp.basename(intact)} is intact: pass --resume {intact} to '
            f'resume from it (training restarts at that point)'
        )
    else:
        fix = (
            f'no intact checkpoint is in {folder}: start again without '
            f'--resume, or copy an intact checkpoint there'
        )
    raise SystemExit(
        f'error: cannot resume from {target} ({named}): {problem}. {fix}.'
    )


def _checkpoint_fit(allow_partial: bool, argv: List[str]) -> List[str]:
    """The test checkpoint must fill the model: ``CheckpointFitHook`` as a
    default hook of mmdet's script (``--allow-partial-checkpoint`` makes
    its refusal a warning and is not passed on)."""
    argv = [a for a in argv if a != '--allow-partial-checkpoint']
    return argv + [
        '--cfg-options',
        'default_hooks.checkpoint_fit.type=CheckpointFitHook',
        f'default_hooks.checkpoint_fit.allow_partial={allow_partial}',
    ]


def _cpu_amp(cfg, argv: List[str]) -> List[str]:
    """``--amp`` without an accelerator: ``CPUAmpOptimWrapper`` instead of
    mmengine's GPU-only ``AmpOptimWrapper``."""
    from mmengine.logging import print_log

    wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if wrapper not in ('OptimWrapper', 'AmpOptimWrapper'):
        raise SystemExit(
            f'--amp needs optim_wrapper.type OptimWrapper or AmpOptimWrapper '
            f'(got {wrapper}); on CPU set '
            f"optim_wrapper.type='CPUAmpOptimWrapper' in the config instead."
        )
    print_log(
        f'--amp / {wrapper} without a GPU: training with '
        'CPUAmpOptimWrapper (CPU autocast).',
        logger='current',
        level=logging.INFO,
    )
    argv = [a for a in argv if a != '--amp']
    return argv + ['--cfg-options', 'optim_wrapper.type=CPUAmpOptimWrapper']


def _cpu_launcher(cfg) -> List[str]:
    """``--launcher pytorch`` without an accelerator: start the gloo group
    here and choose the CPU DDP wrapper."""
    from mmdet_dyhead.engine import init_cpu_process_group

    dist_cfg = cfg.get('env_cfg', {}).get('dist_cfg', {})
    init_cpu_process_group(
        backend=dist_cfg.get('backend', 'nccl'),
        timeout=dist_cfg.get('timeout'),
    )
    wrapper_cfg = cfg.get('model_wrapper_cfg') or {}
    if (
        wrapper_cfg.get('type', 'MMDistributedDataParallel')
        == 'MMDistributedDataParallel'
    ):
        return [
            '--cfg-options',
            'model_wrapper_cfg.type=CPUDistributedDataParallel',
        ]
    return []


def prepare_argv(argv: List[str], train: bool) -> List[str]:
    """Check the config and translate the CPU-only options; returns the
    command line for mmdet's script."""
    from mmengine.config import Config

    from mmdet_dyhead.engine import accelerator_available

    args = _parse(argv, train)
    if args.config is None:  # --help or a usage error: mmdet's parser says
        return argv
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    check_custom_imports(cfg, args.config)
    if train:
        check_resume_target(args, cfg)
    else:
        argv = _checkpoint_fit(args.allow_partial_checkpoint, argv)
    if accelerator_available():
        return argv
    wrapper = cfg.get('optim_wrapper', {}).get('type')
    if train and (args.amp or wrapper == 'AmpOptimWrapper'):
        argv = _cpu_amp(cfg, argv)
    if args.launcher == 'pytorch':
        argv = argv + _cpu_launcher(cfg)
    elif args.launcher not in ('none', 'pytorch'):
        raise SystemExit(
            f'--launcher {args.launcher} without a GPU: mmengine binds a CUDA '
            f'device there. On CPU machines use torchrun with --launcher '
            f'pytorch (docs/distributed.md).'
        )
    return argv


def run_mmdet_tool(relpath: str, argv: Optional[List[str]] = None) -> None:
    """Execute mmdet's ``tools/<relpath>`` as ``__main__`` with the steps of
    this module around it.

    Args:
        relpath (str): ``'train.py'`` or ``'test.py'``.
        argv (list[str], optional): Arguments; default ``sys.argv[1:]``.
    """
    import mmdet_dyhead  # noqa: F401  (registers before the config builds)
    from mmdet_dyhead.checkpoint import CheckpointError, checkpoint_loaders

    argv = list(sys.argv[1:] if argv is None else argv)
    argv = prepare_argv(argv, train=relpath == 'train.py')
    script = mmdet_tool_path(relpath)
    saved = sys.argv
    sys.argv = [script] + argv
    try:
        with checkpoint_loaders():
            runpy.run_path(script, run_name='__main__')
    except CheckpointError as err:
        raise SystemExit(f'error: {err}') from err
    finally:
        sys.argv = saved
        _close_own_process_group()


def _close_own_process_group() -> None:
    # The CPU launcher path started the gloo group, so it also ends it:
    # left to interpreter exit, gloo's threads are destroyed while joinable
    # and a rank aborts ('terminate called without an active exception').
    import torch.distributed as dist

    from mmdet_dyhead.engine import cpu_ddp

    if cpu_ddp.started_process_group() and dist.is_initialized():
        dist.destroy_process_group()
