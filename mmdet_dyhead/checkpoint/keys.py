"""How a checkpoint fits a model, grouped by module, and the checked load
into a model that test, demo, export and the attention plots use.

torch and mmengine print missing and unexpected keys as one comma-separated
line per kind: thousands of names when a checkpoint does not fit.
:class:`KeyReport` groups them by module (``neck.1.dyhead_blocks.{0-5}.
spatial_attn.mid_branch.conv: weight (6 keys)``), lists shape mismatches
once, and recognises common causes. :func:`load_state_dict` loads with it;
:func:`load_checkpoint` reads a file first (:func:`.loaders.load`) and, like
:func:`load_weights` and :class:`CheckpointFitHook`, refuses a checkpoint
that leaves model weights unloaded unless partial loading is allowed.
"""

import logging
import re
from collections import OrderedDict
from typing import Dict, Iterable, List, Sequence, Tuple

import torch
from mmengine.hooks import Hook

from ..registry import HOOKS
from .files import CheckpointError

# mmengine's default: DDP's ``module.`` prefix is stripped.
REVISE_KEYS = ((r'^module\.', ''),)


class CheckpointKeyError(CheckpointError):
    """A checkpoint whose keys or shapes do not fit the model."""


def _ranges(numbers: Iterable[int]) -> str:
    nums = sorted(set(numbers))
    parts, start = [], None
    for i, n in enumerate(nums):
        if start is None:
            start = n
        if i + 1 == len(nums) or nums[i + 1] != n + 1:
            parts.append(str(start) if start == n else f'{start}-{n}')
            start = None
    return (
        parts[0]
        if len(parts) == 1 and '-' not in parts[0]
        else '{' + ','.join(parts) + '}'
    )


def group_keys(keys: Iterable[str]) -> List[Tuple[str, List[str], int]]:
    """Group parameter names by module, folding numbered copies together.

    ``neck.1.dyhead_blocks.{0-5}.spatial_attn.mid_branch.conv`` stands for
    the six blocks' convs. Each group lists its parameter names.

    Args:
        keys (Iterable[str]): Dotted state-dict keys.

    Returns:
        list[tuple[str, list[str], int]]: ``(module pattern, param names,
        number of keys)``, in first-seen order.
    """
    groups: 'OrderedDict[Tuple, Dict]' = OrderedDict()
    for key in keys:
        parts = key.split('.')
        module, leaf = parts[:-1], parts[-1]
        shape = tuple('#' if p.isdigit() else p for p in module)
        group = groups.setdefault(shape, dict(nums={}, leaves=[], count=0))
        for pos, part in enumerate(module):
            if part.isdigit():
                group['nums'].setdefault(pos, set()).add(int(part))
        if leaf not in group['leaves']:
            group['leaves'].append(leaf)
        group['count'] += 1
    out = []
    for shape, group in groups.items():
        name = '.'.join(
            _ranges(group['nums'][pos]) if part == '#' else part
            for pos, part in enumerate(shape)
        )
        out.append((name or '<root>', group['leaves'], group['count']))
    return out


# DCN biases of the spatial-attention branches (our names and mmdet's).
_BRANCH_BIAS = re.compile(
    r'(spatial_conv_(high|mid|low)|_branch)\.conv\.bias$'
)
# ``<prefix>.dyhead_blocks.<i>.`` (the same in our names and mmdet's).
_BLOCK = re.compile(r'^(.*\bdyhead_blocks)\.(\d+)\.')


class KeyReport:
    """How a state dict fitted a model.

    Args:
        missing (Sequence[str]): Model keys the checkpoint lacks.
        unexpected (Sequence[str]): Checkpoint keys the model lacks.
        mismatched (Sequence[tuple]): ``(key, checkpoint shape, model shape)``.
    """

    def __init__(
        self,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[Tuple[str, tuple, tuple]] = (),
    ) -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)

    @property
    def ok(self) -> bool:
        """True when every key fitted."""
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def unloaded(self) -> int:
        """How many model weights the checkpoint left at their initial
        values (missing keys and shape mismatches)."""
        return len(self.missing) + len(self.mismatched)

    def _whole_blocks(self) -> Tuple[List[str], set]:
        """Hints for DyHead blocks that only one side has (a ``num_blocks``
        mismatch), and the keys they explain."""
        hints, explained = [], set()
        sides = (
            ('checkpoint', self.unexpected, self.missing),
            ('model', self.missing, self.unexpected),
        )
        for side, keys, other in sides:
            found: Dict[str, Dict[int, List[str]]] = OrderedDict()
            for key in keys:
                m = _BLOCK.match(key)
                if m:
                    blocks = found.setdefault(m.group(1), {})
                    blocks.setdefault(int(m.group(2)), []).append(key)
            for prefix, blocks in found.items():
                in_other = {
                    int(m.group(2))
                    for k in other
                    for m in [_BLOCK.match(k)]
                    if m and m.group(1) == prefix
                }
                # A whole block: nothing of it on the other side, and more
                # than DCN biases or a stray tensor (every block of any
                # preset has parameters in two or more modules).
                whole = sorted(
                    i
                    for i, ks in blocks.items()
                    if i not in in_other
                    and any(not _BRANCH_BIAS.search(k) for k in ks)
                    and len({k.rsplit('.', 1)[0] for k in ks}) > 1
                )
                first = whole[0] if whole else 0
                if first == 0 or whole != list(range(first, whole[-1] + 1)):
                    continue  # blocks 0.. of both sides must have matched
                more, fewer = whole[-1] + 1, first
                for i in whole:
                    explained.update(blocks[i])
                if side == 'checkpoint':
                    hints.append(
                        f'The checkpoint has {more} DyHead blocks '
                        f'({prefix}.0-{more - 1}) but the model has '
                        f'{fewer}. Fix: set '
                        f"num_blocks={more} in the config's DyHeadNeck, or "
                        f'load a checkpoint trained with {fewer} blocks.'
                    )
                else:
                    hints.append(
                        f'The model has {more} DyHead blocks '
                        f'({prefix}.0-{more - 1}) but the checkpoint has '
                        f'only {fewer}. Fix: set '
                        f"num_blocks={fewer} in the config's DyHeadNeck, "
                        f'or load a checkpoint trained with {more} blocks.'
                    )
        return hints, explained

    def hints(self) -> List[str]:
        """Likely causes, recognised from the key names."""
        hints = []
        if any('dyhead_tower' in k for k in self.unexpected):
            hints.append(
                'The checkpoint is an official microsoft/DynamicHead '
                '(detectron2) one: convert it first with '
                'tools/convert_official_dyhead.py.'
            )
        if self.unexpected and all(
            k.startswith('module.') for k in self.unexpected
        ):
            hints.append(
                "Every unexpected key starts with 'module.': strip it "
                "(revise_keys=[(r'^module\\.', '')])."
            )
        block_hints, explained = self._whole_blocks()
        hints += block_hints
        missing = [k for k in self.missing if k not in explained]
        unexpected = [k for k in self.unexpected if k not in explained]
        if any(_BRANCH_BIAS.search(k) for k in missing):
            hints.append(
                "The model has DCN biases (preset='official') but the "
                "checkpoint does not (mmdet's DyHead): use "
                "DyHeadNeck(preset='mmdet') or dcn_bias=False."
            )
        if any(_BRANCH_BIAS.search(k) for k in unexpected):
            hints.append(
                'The checkpoint has DCN biases (official DyHead) but '
                "the model does not: use DyHeadNeck(preset='official') "
                'or dcn_bias=True.'
            )
        return hints

    def format(self, max_groups: int = 30) -> str:
        """The report as text, one line per module group.

        Args:
            max_groups (int): Groups shown per section before eliding.
        """
        lines = []
        sections = (
            (
                'missing keys (in the model, not in the checkpoint)',
                self.missing,
            ),
            (
                'unexpected keys (in the checkpoint, not in the model)',
                self.unexpected,
            ),
        )
        for title, keys in sections:
            if not keys:
                continue
            tops = OrderedDict()
            for k in keys:
                tops[k.split('.')[0]] = tops.get(k.split('.')[0], 0) + 1
            groups = group_keys(keys)
            lines.append(
                f'{len(keys)} {title}, {len(groups)} module group(s); '
                'by top-level module: '
                + ', '.join(f'{t} {n}' for t, n in tops.items())
            )
            for name, leaves, count in groups[:max_groups]:
                lines.append(
                    f'  {name}: {", ".join(leaves)} ({count} key'
                    f'{"s" if count > 1 else ""})'
                )
            if len(groups) > max_groups:
                lines.append(
                    f'  ... and {len(groups) - max_groups} more groups'
                )
        if self.mismatched:
            lines.append(
                f'{len(self.mismatched)} shape mismatch(es) (not loaded):'
            )
            for key, got, want in self.mismatched[:max_groups]:
                lines.append(
                    f'  {key}: checkpoint {tuple(got)}, model {tuple(want)}'
                )
            if len(self.mismatched) > max_groups:
                lines.append(
                    f'  ... and {len(self.mismatched) - max_groups} more'
                )
        for hint in self.hints():
            lines.append(f'hint: {hint}')
        return '\n'.join(lines) if lines else 'all keys matched'

    __str__ = format


def _fit_mmdet_names(state_dict: Dict, own: Dict) -> 'OrderedDict':
    """mmdet ``DyHead`` keys under the names the model holds them (the
    blocks rename them on load anyway), so shapes compare before loading."""
    from mmdet_dyhead.models.key_mapping import from_mmdet_keys

    out = OrderedDict()
    for key, value in state_dict.items():
        if key not in own:
            renamed = next(iter(from_mmdet_keys({key: None})))
            key = renamed if renamed in own else key
        out[key] = value
    return out


def load_state_dict(
    module: torch.nn.Module, state_dict: Dict, strict: bool = False
) -> KeyReport:
    """Load what fits of ``state_dict`` into ``module``; report the rest,
    grouped by module.

    As ``mmengine.runner.checkpoint.load_state_dict``: model wrappers and
    TTA models are unwrapped, tensors of a different shape are skipped, and
    missing BN ``num_batches_tracked`` counters are not reported (they carry
    no weights). The report is returned, not logged.

    Args:
        module (nn.Module): The model (or a wrapper such as DDP or a
            ``BaseTTAModel``).
        state_dict (dict): Weights.
        strict (bool): Raise :class:`CheckpointKeyError` on any mismatch.

    Returns:
        KeyReport: What did not fit.
    """
    from mmengine.model import BaseTTAModel, is_model_wrapper

    if is_model_wrapper(module) or isinstance(module, BaseTTAModel):
        module = module.module
    metadata = getattr(state_dict, '_metadata', None)
    own = module.state_dict()
    state_dict = _fit_mmdet_names(state_dict, own)
    mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape))
        for k, v in state_dict.items()
        if k in own and hasattr(v, 'shape') and v.shape != own[k].shape
    ]
    skip = {k for k, _, _ in mismatched}
    filtered = OrderedDict(
        (k, v) for k, v in state_dict.items() if k not in skip
    )
    if metadata is not None:
        filtered._metadata = metadata
    try:
        result = module.load_state_dict(filtered, strict=False)
    except RuntimeError as err:
        # Shapes of keys that a submodule renames while loading, under
        # names this report does not know, are only checked by torch.
        raise CheckpointKeyError(
            f'Checkpoint does not fit the model: {err}'
        ) from err
    missing = [
        k
        for k in result.missing_keys
        if k not in skip and not k.endswith('num_batches_tracked')
    ]
    report = KeyReport(missing, result.unexpected_keys, mismatched)
    if strict and not report.ok:
        raise CheckpointKeyError(
            'The checkpoint does not fit the model:\n' + report.format()
        )
    return report


def extract_state_dict(checkpoint: object, source: str = 'checkpoint') -> Dict:
    """The weights of a read checkpoint, as mmengine takes them: its
    ``state_dict`` entry, else the dict itself.

    Args:
        checkpoint: What :func:`.loaders.load` returned.
        source (str): The file, for the message.
    """
    if isinstance(checkpoint, dict) and 'state_dict' in checkpoint:
        checkpoint = checkpoint['state_dict']
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f'{source} holds a {type(checkpoint).__name__}, not a dict of '
            f'weights. Fix: give a checkpoint saved with '
            f"torch.save({{'state_dict': model.state_dict()}}, path)."
        )
    return checkpoint


def load_weights(
    model: torch.nn.Module,
    checkpoint: object,
    source: str,
    allow_partial: bool = False,
    revise_keys: Sequence[Tuple[str, str]] = REVISE_KEYS,
    logger=None,
) -> KeyReport:
    """Load a read checkpoint into ``model``; refuse one that leaves model
    weights unloaded (missing keys, other shapes) unless ``allow_partial``.

    Keys only the checkpoint has are reported as a warning.

    Args:
        model (nn.Module): Target model (or a wrapper).
        checkpoint: What :func:`.loaders.load` returned.
        source (str): The file, for the messages.
        allow_partial (bool): Keep what fits and warn instead.
        revise_keys (Sequence[tuple[str, str]]): Regex renames applied to
            the keys first (default strips DDP's ``module.``).
        logger: mmengine logger for the warning.

    Raises:
        CheckpointKeyError: Model weights stay unloaded and partial loading
            is not allowed.
    """
    from mmengine.logging import print_log

    state_dict = extract_state_dict(checkpoint, source)
    metadata = getattr(state_dict, '_metadata', None)
    for pattern, repl in revise_keys:
        state_dict = OrderedDict(
            (re.sub(pattern, repl, k), v) for k, v in state_dict.items()
        )
    if metadata is not None:
        state_dict._metadata = metadata
    report = load_state_dict(model, state_dict)
    if report.unloaded and not allow_partial:
        raise CheckpointKeyError(
            f'{source} leaves {report.unloaded} weight(s) of the model '
            f'unloaded: it is not a checkpoint of this config.\n'
            f'{report.format()}\nFix: give the checkpoint trained with this '
            f'config (see the hints), or, to run with those weights at their '
            f'initial values, allow a partial checkpoint '
            f'(--allow-partial-checkpoint; allow_partial=True in Python).'
        )
    if not report.ok:
        print_log(
            f'{source} does not fit the model:\n{report.format()}',
            logger=logger or 'current',
            level=logging.WARNING,
        )
    return report


def load_checkpoint(
    model: torch.nn.Module,
    filename: str,
    map_location='cpu',
    allow_partial: bool = False,
    revise_keys: Sequence[Tuple[str, str]] = REVISE_KEYS,
    logger=None,
) -> KeyReport:
    """Read ``filename`` with :func:`.loaders.load` and load it into
    ``model`` with :func:`load_weights`.

    Args:
        model (nn.Module): Target model.
        filename (str): Local path, http(s) URL or ``dyhead://<model name>``.
        map_location: As in :func:`torch.load`. Default 'cpu'.
        allow_partial (bool): Load what fits when model weights stay
            unloaded (warned), instead of raising.
        revise_keys (Sequence[tuple[str, str]]): Regex renames of the keys.
        logger: mmengine logger for the warning.

    Returns:
        KeyReport: What did not fit.
    """
    from .loaders import load

    checkpoint = load(filename, map_location)
    return load_weights(
        model, checkpoint, filename, allow_partial, revise_keys, logger
    )


@HOOKS.register_module()
class CheckpointFitHook(Hook):
    """Refuse a ``load_from`` checkpoint that leaves model weights unloaded.

    mmengine loads ``load_from`` non-strictly and logs what did not fit in
    one line; with this hook the run stops before it starts instead, with
    the grouped key report and its hints. The package's ``tools/test.py``
    adds it (``--allow-partial-checkpoint`` turns the refusal into a
    warning); a config can add it too::

        custom_hooks = [dict(type='CheckpointFitHook')]

    Args:
        allow_partial (bool): Only report (warning) instead of refusing.
    """

    priority = 'VERY_HIGH'

    def __init__(self, allow_partial: bool = False) -> None:
        self.allow_partial = allow_partial

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        # Runner.load_checkpoint calls it for load_from and for resume.
        load_weights(
            runner.model,
            checkpoint,
            str(runner.cfg.get('load_from') or 'the checkpoint'),
            self.allow_partial,
            logger=runner.logger,
        )
