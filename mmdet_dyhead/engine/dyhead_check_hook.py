"""A hook that checks how a DyHead detector is wired, before it runs.

A DyHead detector that is wired wrongly (FPN and DyHead channels that do not
match, a pyramid with more or fewer levels than the head has strides, a
dense head that still stacks its own conv towers after DyHead) would
otherwise build fine and fail, or silently train something else, later.
In a two-stage detector the RoI extractors (box and mask) must read the
DyHead channels and levels, and each box head the extractor's channels;
a cascade's stages are checked one by one.
Like mmdet's ``NumClassCheckHook``, :class:`DyHeadCheckHook` is enabled in
the config and runs before training, validation and testing; the package's
configs enable it::

    custom_hooks = [dict(type='DyHeadCheckHook')]

To keep a dense head's conv towers after DyHead on purpose (the official
RetinaNet+DyHead did), pass ``allow_head_towers=True``. Detectors without a
``DyHeadNeck`` pass unchecked. :func:`check_dyhead_detector` is the same
check for a model built by hand (``init_detector``, ``MODELS.build``).
"""

from typing import List, Optional

import torch.nn as nn
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from mmdet_dyhead.models.necks.dyhead_neck import DyHeadNeck
from mmdet_dyhead.registry import HOOKS


class DyHeadConfigError(ValueError):
    """A DyHead detector config whose parts do not fit together."""


def _neck_modules(neck: nn.Module) -> List[nn.Module]:
    if isinstance(neck, nn.Sequential):
        return list(neck)
    return [neck]


def _fail(problems: List[str]) -> None:
    if problems:
        raise DyHeadConfigError(
            'DyHead detector config does not fit together:\n  - '
            + '\n  - '.join(problems)
        )


def _check_dense_head(
    head: nn.Module,
    name: str,
    channels: int,
    levels: Optional[int],
    allow_head_towers: bool,
    check_towers: bool,
) -> List[str]:
    problems = []
    in_channels = getattr(head, 'in_channels', None)
    if isinstance(in_channels, int) and in_channels != channels:
        problems.append(
            f'model.{name}.in_channels={in_channels} but DyHeadNeck '
            f'out_channels={channels}; set model.{name}.in_channels='
            f'{channels}.'
        )
    strides = getattr(getattr(head, 'prior_generator', None), 'strides', None)
    if levels is not None and strides is not None and len(strides) != levels:
        problems.append(
            f'model.{name} predicts on {len(strides)} levels (strides '
            f'{[s[0] if isinstance(s, tuple) else s for s in strides]}) but '
            f'the pyramid after DyHeadNeck has {levels}; give the head one '
            f'stride per level (anchor_generator.strides, strides or '
            f'point_strides) or change FPN num_outs and DyHeadNeck '
            f'num_levels.'
        )
    stacked = getattr(head, 'stacked_convs', None)
    if check_towers and isinstance(stacked, int):
        if stacked > 0 and not allow_head_towers:
            problems.append(
                f'model.{name}.stacked_convs={stacked}: DyHead replaces the '
                f'per-task conv towers with one unified branch (paper Fig. '
                f'2b). Set model.{name}.stacked_convs=0, or use '
                f"dict(type='DyHeadCheckHook', allow_head_towers=True) in "
                f'custom_hooks to keep them on purpose.'
            )
        feat = getattr(head, 'feat_channels', None)
        if (
            stacked == 0
            and isinstance(feat, int)
            and isinstance(in_channels, int)
            and feat != in_channels
        ):
            problems.append(
                f'model.{name}.feat_channels={feat} but stacked_convs=0, so '
                f'the predictors read the {in_channels}-channel DyHead '
                f'output directly; set model.{name}.feat_channels='
                f'{in_channels}.'
            )
    return problems


def _stages(module: Optional[nn.Module], name: str) -> list:
    """``[(config path, module), ...]``: one entry, or one per stage of a
    cascade (``CascadeRoIHead`` keeps a ModuleList of each)."""
    if isinstance(module, nn.ModuleList):
        return [(f'{name}[{i}]', m) for i, m in enumerate(module)]
    return [] if module is None else [(name, module)]


def _check_roi_head(
    roi_head: nn.Module, channels: int, levels: Optional[int]
) -> List[str]:
    problems = []
    prefix = 'model.roi_head.'
    extractors, seen = {}, set()
    for kind in ('bbox_roi_extractor', 'mask_roi_extractor'):
        extractors[kind] = _stages(getattr(roi_head, kind, None), kind)
        for name, extractor in extractors[kind]:
            # share_roi_extractor=True: the mask branch reuses the box one.
            if id(extractor) in seen:
                continue
            seen.add(id(extractor))
            ext_channels = getattr(extractor, 'out_channels', None)
            if isinstance(ext_channels, int) and ext_channels != channels:
                problems.append(
                    f'{prefix}{name}.out_channels={ext_channels} but '
                    f'DyHeadNeck out_channels={channels}; set it to '
                    f'{channels}.'
                )
            strides = getattr(extractor, 'featmap_strides', None)
            if (
                levels is not None
                and strides is not None
                and len(strides) > levels
            ):
                problems.append(
                    f'{prefix}{name}.featmap_strides has {len(strides)} '
                    f'levels but the pyramid has {levels}; list at most '
                    f'{levels} strides.'
                )
    # Stage i's box head reads stage i's extractor (one shared extractor
    # outside a cascade).
    box_extractors = extractors['bbox_roi_extractor']
    for i, (name, bbox_head) in enumerate(
        _stages(getattr(roi_head, 'bbox_head', None), 'bbox_head')
    ):
        if not box_extractors:
            break
        extractor = box_extractors[min(i, len(box_extractors) - 1)][1]
        ext_channels = getattr(extractor, 'out_channels', None)
        bbox_in = getattr(bbox_head, 'in_channels', None)
        if (
            isinstance(bbox_in, int)
            and isinstance(ext_channels, int)
            and bbox_in != ext_channels
        ):
            problems.append(
                f'{prefix}{name}.in_channels={bbox_in} but the RoI '
                f'extractor gives {ext_channels} channels; set '
                f'{prefix}{name}.in_channels={ext_channels}.'
            )
    return problems


def check_dyhead_detector(
    model: nn.Module, allow_head_towers: bool = False
) -> None:
    """Raise :class:`DyHeadConfigError` if a DyHead detector is miswired.

    Does nothing for models without a ``DyHeadNeck`` in ``model.neck``.

    Args:
        model (nn.Module): A built mmdet detector (any ``nn.Module``).
        allow_head_towers (bool): Accept a dense head with
            ``stacked_convs > 0`` after DyHead.
    """
    neck = getattr(model, 'neck', None)
    if not isinstance(neck, nn.Module):
        return
    modules = _neck_modules(neck)
    dyhead_ids = [
        i for i, m in enumerate(modules) if isinstance(m, DyHeadNeck)
    ]
    if not dyhead_ids:
        return
    problems = []
    levels = None
    for i in dyhead_ids:
        dyhead = modules[i]
        levels = dyhead.num_levels
        if i == 0:
            continue
        prev, prev_name = modules[i - 1], type(modules[i - 1]).__name__
        prev_out = getattr(prev, 'out_channels', None)
        if isinstance(prev_out, int) and prev_out != dyhead.in_channels:
            problems.append(
                f'model.neck[{i - 1}] ({prev_name}) out_channels={prev_out} '
                f'but model.neck[{i}] (DyHeadNeck) in_channels='
                f'{dyhead.in_channels}; set model.neck[{i}].in_channels='
                f'{prev_out} (DyHead needs the same channels on every '
                f'level).'
            )
        num_outs = getattr(prev, 'num_outs', None)
        if isinstance(num_outs, int):
            if levels is not None and levels != num_outs:
                problems.append(
                    f'model.neck[{i - 1}] ({prev_name}) num_outs={num_outs} '
                    f'but model.neck[{i}] (DyHeadNeck) num_levels={levels}; '
                    f'set model.neck[{i}].num_levels={num_outs}.'
                )
            # What the FPN really produces is what the head will receive.
            levels = num_outs
    if dyhead_ids[-1] == len(modules) - 1:
        # Only the head right after DyHead is known to read its output.
        channels = modules[-1].out_channels
        for name, check_towers in (('bbox_head', True), ('rpn_head', False)):
            head = getattr(model, name, None)
            if isinstance(head, nn.Module):
                problems += _check_dense_head(
                    head,
                    name,
                    channels,
                    levels,
                    allow_head_towers,
                    check_towers,
                )
        roi_head = getattr(model, 'roi_head', None)
        if isinstance(roi_head, nn.Module):
            problems += _check_roi_head(roi_head, channels, levels)
    _fail(problems)


@HOOKS.register_module()
class DyHeadCheckHook(Hook):
    """Run :func:`check_dyhead_detector` before train, val and test.

    Args:
        allow_head_towers (bool): Accept a dense head with
            ``stacked_convs > 0`` after DyHead. Default False.
    """

    priority = 'VERY_HIGH'

    def __init__(self, allow_head_towers: bool = False) -> None:
        self.allow_head_towers = allow_head_towers

    def _check(self, runner) -> None:
        model = runner.model
        if is_model_wrapper(model):
            model = model.module
        # mmdet's TTA wrapper keeps the detector as .module as well.
        model = getattr(model, 'module', model)
        check_dyhead_detector(model, self.allow_head_towers)

    def before_train(self, runner) -> None:
        self._check(runner)

    def before_val(self, runner) -> None:
        self._check(runner)

    def before_test(self, runner) -> None:
        self._check(runner)
