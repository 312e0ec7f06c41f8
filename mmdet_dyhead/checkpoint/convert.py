"""Convert a microsoft/DynamicHead (detectron2) ATSS checkpoint to
mmdet-dyhead.

The official release (``dyhead_r50_atss_fpn_1x``: ATSS, caffe R-50, FPN
P3-P7, 6 DyHead blocks, ATSS head without towers) stores everything but the
head under ``backbone.``: the ResNet as ``backbone.backbone.bottom_up``, the
FPN beside it, and the DyHead tower as ``backbone.dyhead_tower``.
:func:`convert_state_dict` renames every tensor to the layout of
``configs/atss/atss_r50-caffe_fpn_dyhead-6b_official_1x_coco.py`` (whose
``DyHeadNeck(preset='official')`` has the DCN biases the release has), and
:func:`convert_file` refuses to write anything when a tensor is left
unmapped or, given a config, when the result does not fit the model key for
key. The command line is ``tools/convert_official_dyhead.py``.
"""

import os
import os.path as osp
import re
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch

from .files import CheckpointError, sha256_of
from .keys import group_keys, load_state_dict
from .loaders import load

DEFAULT_CONFIG = (
    'configs/atss/atss_r50-caffe_fpn_dyhead-6b_official_1x_coco.py'
)

# official DyConv list order is (high, mid, low): DyConv[0] reads level l+1,
# DyConv[1] level l, DyConv[2] level l-1 with stride 2.
DYCONV_BRANCH = {
    '0': 'spatial_conv_high',
    '1': 'spatial_conv_mid',
    '2': 'spatial_conv_low',
}
HEAD_RULES = {
    'cls_logits': 'atss_cls',
    'bbox_pred': 'atss_reg',
    'centerness': 'atss_centerness',
}
# Buffers detectron2 may store that have no parameter here; their values are
# fixed by the config instead (checked where it matters).
CAFFE_MEAN = (103.53, 116.28, 123.675)
CAFFE_STD = (1.0, 1.0, 1.0)
# detectron2's anchor buffers, on the meta-architecture or on the head.
ANCHOR_BUFFER = re.compile(r'(head\.)?anchor_generator\.cell_anchors\.\d+')
# DistributedDataParallel's wrapper prefix, in a state dict saved from it.
DDP_PREFIX = 'module.'


class ConversionError(ValueError):
    """The source checkpoint does not have the expected layout."""


def _resnet_key(rest: str) -> Optional[str]:
    m = re.fullmatch(r'stem\.conv1\.weight', rest)
    if m:
        return 'backbone.conv1.weight'
    m = re.fullmatch(r'stem\.conv1\.norm\.(\w+)', rest)
    if m:
        return f'backbone.bn1.{m.group(1)}'
    m = re.fullmatch(
        r'res(\d)\.(\d+)\.(conv\d|shortcut)(\.norm)?\.(\w+)', rest
    )
    if not m:
        return None
    stage, block, part, norm, leaf = m.groups()
    layer = f'backbone.layer{int(stage) - 1}.{block}'
    if part == 'shortcut':
        return f'{layer}.downsample.{1 if norm else 0}.{leaf}'
    idx = part[-1]
    return f'{layer}.bn{idx}.{leaf}' if norm else f'{layer}.conv{idx}.{leaf}'


def _dyhead_key(rest: str) -> Optional[Tuple[str, bool]]:
    """Official tower key -> (mmdet DyHead key, needs 1x1 unsqueeze)."""
    m = re.fullmatch(r'(\d+)\.DyConv\.([012])\.(conv|bn)\.(weight|bias)', rest)
    if m:
        block, branch, part, leaf = m.groups()
        part = 'conv' if part == 'conv' else 'norm'
        return (
            f'neck.1.dyhead_blocks.{block}.{DYCONV_BRANCH[branch]}.{part}.{leaf}',
            False,
        )
    m = re.fullmatch(r'(\d+)\.offset\.(weight|bias)', rest)
    if m:
        return (
            f'neck.1.dyhead_blocks.{m.group(1)}.spatial_conv_offset.{m.group(2)}',
            False,
        )
    m = re.fullmatch(r'(\d+)\.AttnConv\.1\.(weight|bias)', rest)
    if m:
        return (
            f'neck.1.dyhead_blocks.{m.group(1)}.scale_attn_module.1.{m.group(2)}',
            False,
        )
    m = re.fullmatch(r'(\d+)\.relu\.fc\.([02])\.(weight|bias)', rest)
    if m:
        block, fc, leaf = m.groups()
        conv = 'conv1' if fc == '0' else 'conv2'
        return (
            f'neck.1.dyhead_blocks.{block}.task_attn_module.{conv}.conv.{leaf}',
            leaf == 'weight',
        )
    return None


def _check_pixel_stats(key: str, value: torch.Tensor) -> None:
    want = CAFFE_MEAN if key == 'pixel_mean' else CAFFE_STD
    got = tuple(float(x) for x in value.flatten())
    if len(got) != 3 or any(abs(a - b) > 1e-3 for a, b in zip(got, want)):
        raise ConversionError(
            f'{key} of the source is {got}, the config expects caffe BGR '
            f"{want}. This is not the R-50 (caffe) release; set the config's "
            f'data_preprocessor mean/std/bgr_to_rgb to match before using it.'
        )


def convert_state_dict(
    src: Dict[str, torch.Tensor],
) -> Tuple['OrderedDict[str, torch.Tensor]', List[str]]:
    """Rename an official ATSS+DyHead state dict to mmdet-dyhead's keys.

    Args:
        src (dict): The detectron2 ``model`` state dict.

    Returns:
        tuple: the converted state dict (our key names, BN
        ``num_batches_tracked`` counters added) and the source keys that were
        consumed without a target (``pixel_mean``/``pixel_std``, anchor
        buffers ``anchor_generator.cell_anchors.<i>``, at the top level or
        under ``head.``).

    Raises:
        ConversionError: a key has no rule, or two keys map to one target.
    """
    from mmdet_dyhead.models.key_mapping import from_mmdet_keys

    out: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    dropped, unmapped = [], []
    laterals = sorted(
        {
            int(m.group(1))
            for k in src
            for m in [re.search(r'\.fpn_lateral(\d)\.', k)]
            if m
        }
    )
    n_fpn = len(laterals)
    for key, value in src.items():
        target, unsqueeze = None, False
        if ANCHOR_BUFFER.fullmatch(key):
            dropped.append(key)  # rebuilt from the config's anchor settings
            continue
        if key.startswith('backbone.backbone.bottom_up.'):
            target = _resnet_key(key[len('backbone.backbone.bottom_up.') :])
        elif key.startswith('backbone.backbone.'):
            rest = key[len('backbone.backbone.') :]
            m = re.fullmatch(r'fpn_(lateral|output)(\d)\.(weight|bias)', rest)
            p = re.fullmatch(r'top_block\.p([67])\.(weight|bias)', rest)
            if m:
                kind = (
                    'lateral_convs' if m.group(1) == 'lateral' else 'fpn_convs'
                )
                idx = laterals.index(int(m.group(2)))
                target = f'neck.0.{kind}.{idx}.conv.{m.group(3)}'
            elif p:
                # P6/P7 are mmdet FPN's extra convs, after the n_fpn outputs.
                idx = n_fpn + int(p.group(1)) - 6
                target = f'neck.0.fpn_convs.{idx}.conv.{p.group(2)}'
        elif key.startswith('backbone.dyhead_tower.'):
            found = _dyhead_key(key[len('backbone.dyhead_tower.') :])
            if found:
                target, unsqueeze = found
        elif key.startswith('head.'):
            rest = key[len('head.') :]
            m = re.fullmatch(
                r'(cls_logits|bbox_pred|centerness)\.(weight|bias)', rest
            )
            s = re.fullmatch(r'scales\.(\d+)\.scale', rest)
            if m:
                target = f'bbox_head.{HEAD_RULES[m.group(1)]}.{m.group(2)}'
            elif s:
                target = f'bbox_head.scales.{s.group(1)}.scale'
                value = value.reshape(())  # mmcv's Scale is a 0-d parameter
        elif key in ('pixel_mean', 'pixel_std'):
            _check_pixel_stats(key, value)
            dropped.append(key)
            continue
        if target is None:
            unmapped.append(key)
            continue
        if unsqueeze:
            value = value[:, :, None, None]
        if target in out:
            raise ConversionError(
                f'{key} maps to {target}, which another key already filled.'
            )
        out[target] = value
    if unmapped:
        lines = '\n'.join(
            f'  {name}: {", ".join(leaves)} ({n})'
            for name, leaves, n in group_keys(unmapped)
        )
        raise ConversionError(
            f'{len(unmapped)} tensor(s) of the source have no rule:\n{lines}\n'
            'This converter handles the ATSS R-50 DyHead release '
            '(dyhead_r50_atss_fpn_1x); RetinaNet, R-CNN and Swin variants '
            'have other heads/backbones. Nothing was written.'
        )
    for key in [k for k in out if k.endswith('.running_var')]:
        # detectron2's FrozenBN has no step counter; mmdet's BN does.
        out[key[: -len('running_var')] + 'num_batches_tracked'] = torch.tensor(
            0
        )
    return from_mmdet_keys(out), dropped


def load_official(path: str) -> Dict[str, torch.Tensor]:
    """Read the ``model`` state dict of a detectron2 checkpoint (weights only).

    A state dict saved from a ``DistributedDataParallel``-wrapped model
    (every key starting with ``module.``) is read with that prefix stripped.

    Args:
        path (str): ``.pth``/``.bin`` file saved by detectron2's Checkpointer.
    """
    if path.endswith('.pkl'):
        raise ConversionError(
            f'{path}: detectron2 .pkl files are plain pickles of numpy '
            'arrays, which are not loaded here (unpickling can run code). '
            'The DyHead release ships .pth files; use one of those.'
        )
    ckpt = load(path, map_location='cpu')
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f'{path} holds a {type(ckpt).__name__}, not a dict.'
        )
    state = ckpt.get('model', ckpt)
    if (
        isinstance(state, dict)
        and state
        and all(str(k).startswith(DDP_PREFIX) for k in state)
    ):
        # saved from a DistributedDataParallel-wrapped model
        state = OrderedDict(
            (k[len(DDP_PREFIX) :], v) for k, v in state.items()
        )
        print(
            f"note: {path}: every key starts with DDP's {DDP_PREFIX!r}; "
            'converting with that prefix stripped.',
            file=sys.stderr,
        )
    tower = 'backbone.dyhead_tower.'
    if not isinstance(state, dict) or not any(
        k.startswith(tower) for k in state
    ):
        nested = (
            [k for k in state if tower in k] if isinstance(state, dict) else []
        )
        if nested:
            prefix = nested[0][: nested[0].index(tower)]
            raise ConversionError(
                f'{path} looks like an official DynamicHead checkpoint whose '
                f'keys carry an extra prefix {prefix!r} (e.g. {nested[0]!r}); '
                f'the converter expects {tower!r} at the start. Fix: load '
                f'it, strip {prefix!r} from every key, save it again and '
                'convert that file.'
            )
        top = sorted(ckpt)[:8]
        raise ConversionError(
            f'{path} is not an official DynamicHead checkpoint: no '
            f"'{tower}*' weights (top-level keys: {top}). "
            'mmdet DyHead checkpoints need no conversion: load them '
            'directly.'
        )
    return state


def convert_file(
    src: str,
    dst: str,
    config: Optional[str] = DEFAULT_CONFIG,
    hash_name: bool = False,
) -> str:
    """Convert ``src`` and save it as an mmengine checkpoint at ``dst``.

    Args:
        src (str): Official checkpoint.
        dst (str): Output path.
        config (str, optional): Config whose model must accept the result
            with no missing, unexpected or mis-shaped key; None skips that.
        hash_name (bool): Append ``-<first 8 hex of sha256>`` to the output
            name, so loading it later checks the file.

    Returns:
        str: The written path.
    """
    state, dropped = convert_state_dict(load_official(src))
    if config:
        from mmdet.apis import init_detector

        import mmdet_dyhead  # noqa: F401  (registers DyHeadNeck)

        model = init_detector(config, device='cpu')
        load_state_dict(model, state, strict=True)
    meta = dict(
        converted_from=osp.basename(src),
        source_sha256=sha256_of(src),
        dropped_keys=dropped,
        config=osp.basename(config) if config else None,
    )
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    torch.save(dict(meta=meta, state_dict=state), dst)
    if hash_name:
        stem, ext = osp.splitext(dst)
        named = f'{stem}-{sha256_of(dst)[:8]}{ext or ".pth"}'
        os.replace(dst, named)
        dst = named
    return dst
