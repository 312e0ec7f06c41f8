"""Forward-hook collectors for DyHead features and scale-aware weights.

Nothing here changes the model: hooks are attached to existing modules,
read tensors as they pass, and are removed on :meth:`remove` (or when the
collector is used as a context manager).
"""

from collections import defaultdict, deque
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor


def find_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Modules the visualisation tools can attach to, by qualified name.

    Returns every ``DyHeadNeck`` and every ``DynamicHeadBlock`` of ``model``
    (e.g. ``'neck.1'``, ``'neck.1.dyhead_blocks.0'``).

    Args:
        model (nn.Module): A detector or a bare neck.

    Returns:
        dict[str, nn.Module]: Name -> module, in definition order.
    """
    from mmdet_dyhead.models.layers import DynamicHeadBlock
    from mmdet_dyhead.models.necks import DyHeadNeck

    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (DyHeadNeck, DynamicHeadBlock))
    }


def resolve_layer(
    model: nn.Module, name: Optional[str] = None
) -> Tuple[str, nn.Module]:
    """The DyHead neck (or block) called ``name``; the first neck if None.

    Args:
        model (nn.Module): A detector or a bare neck.
        name (str, optional): Qualified module name, see :func:`find_layers`.

    Returns:
        tuple[str, nn.Module]: The name and the module.

    Raises:
        ValueError: No such layer; the message lists the available ones.
    """
    from mmdet_dyhead.models.necks import DyHeadNeck

    layers = find_layers(model)
    if not layers:
        raise ValueError(
            f'{type(model).__name__} has no DyHeadNeck; the '
            f"attention plots need a neck of type='DyHeadNeck'."
        )
    if name is None:
        name = next(n for n, m in layers.items() if isinstance(m, DyHeadNeck))
    if name not in layers:
        listing = '\n  '.join(layers)
        raise ValueError(
            f"layer '{name}' does not exist in this model. "
            f'Layers that can be visualised:\n  {listing}'
        )
    return name, layers[name]


def _blocks_of(module: nn.Module) -> List[nn.Module]:
    blocks = getattr(module, 'dyhead_blocks', None)
    return list(blocks) if blocks is not None else [module]


def _detach_levels(feats) -> List[Tensor]:
    return [f.detach().float().cpu() for f in feats]


class BlockFeatureCollector:
    """Feature maps before the first block and after every block.

    ``stages[0]`` holds the neck input (FPN output, "before"), ``stages[k]``
    the output of block ``k`` (1-based, as the paper counts blocks).

    Args:
        module (nn.Module): A ``DyHeadNeck`` (all its blocks) or one
            ``DynamicHeadBlock``.

    Attributes:
        stages (dict[int, list[Tensor]]): Stage -> L tensors (N, C, H_l, W_l)
            from the most recent forward, on CPU in float32.
    """

    def __init__(self, module: nn.Module) -> None:
        self.blocks = _blocks_of(module)
        self.stages: Dict[int, List[Tensor]] = {}
        self._handles = []
        first = self.blocks[0]
        self._handles.append(first.register_forward_pre_hook(self._before))
        for k, block in enumerate(self.blocks, start=1):
            self._handles.append(
                block.register_forward_hook(
                    lambda m, inputs, output, k=k: self._after(k, output)
                )
            )

    def _before(self, module, inputs) -> None:
        self.stages = {0: _detach_levels(inputs[0])}

    def _after(self, k: int, output) -> None:
        self.stages[k] = _detach_levels(output)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def fusion_order(num_levels: int) -> List[Tuple[int, int]]:
    """(output level, source level) of every term a block fuses, in order.

    The order of ``SpatialAwareAttention.level_terms`` (mid, then the finer
    neighbour, then the coarser one), level by level, which is the order in
    which ``DynamicHeadBlock.forward`` weighs the terms.
    """
    order = []
    for level in range(num_levels):
        order.append((level, level))
        if level > 0:
            order.append((level, level - 1))
        if level < num_levels - 1:
            order.append((level, level + 1))
    return order


class ScaleWeightCollector:
    """The scale-aware weights pi_L per block, output level and source level.

    A DyHead block fuses, for output level l, terms read from levels l-1
    (finer), l and l+1 (coarser), each multiplied by a scalar from its
    ``ScaleAwareAttention`` (Eq. 3). A pre-hook on the block reads the
    pyramid it gets; a hook on the scale attention receives each weight
    together with the feature it was computed from, and pairs it with the
    next term of :func:`fusion_order`. The feature's size is checked
    against the level that term belongs to, so a change in the block's
    order fails loudly instead of mislabelling weights.
    With ``attention_order='scale_first'`` the attention runs once per
    input level and that weight is shared by every term read from it.

    Args:
        module (nn.Module): A ``DyHeadNeck`` or one ``DynamicHeadBlock``.

    Attributes:
        weights (dict): ``weights[block][(out_level, src_level)]`` is a list
            of (N,) tensors, one per forward (accumulates over batches);
            blocks are 1-based. Empty for blocks without scale attention.
    """

    def __init__(self, module: nn.Module) -> None:
        self.blocks = _blocks_of(module)
        self.weights = defaultdict(lambda: defaultdict(list))
        self._handles = []
        self._state = {}
        for k, block in enumerate(self.blocks, start=1):
            if block.scale_attn is None:
                continue
            self._handles += [
                block.register_forward_pre_hook(
                    lambda m, inputs, k=k: self._start(k, m, inputs[0])
                ),
                block.scale_attn.register_forward_hook(
                    lambda m, inputs, out, k=k: self._weight(k, inputs[0], out)
                ),
            ]

    def _start(self, k: int, block: nn.Module, feats) -> None:
        scale_first = block.attention_order == 'scale_first'
        order = fusion_order(len(feats))
        self._state[k] = dict(
            scale_first=scale_first,
            sizes=[tuple(f.shape[-2:]) for f in feats],
            # scale_first: one call per input level, in level order.
            pending=deque(range(len(feats)) if scale_first else order),
            order=order,
        )

    def _weight(self, k: int, source: Tensor, out: Tensor) -> None:
        st = self._state[k]
        if not st['pending']:
            raise RuntimeError(
                f'block {k} computed more scale weights than '
                f'it has terms; DynamicHeadBlock.forward no longer '
                f'matches ScaleWeightCollector.'
            )
        item = st['pending'].popleft()
        w = out.detach().float().cpu().flatten()
        size_level = item if st['scale_first'] else item[0]
        if tuple(source.shape[-2:]) != st['sizes'][size_level]:
            raise RuntimeError(
                f'block {k}: scale weight for {item} was computed from a '
                f'{tuple(source.shape[-2:])} map, expected level {size_level} '
                f'{st["sizes"][size_level]}; DynamicHeadBlock.forward no '
                f'longer matches ScaleWeightCollector.'
            )
        if st['scale_first']:
            for level, src in st['order']:
                if src == item:
                    self.weights[k][(level, src)].append(w)
        else:
            self.weights[k][item].append(w)

    def scale_ratios(self, block: int) -> Dict[int, Tensor]:
        """Paper Figure 3's "scale ratio" per output level, for one block.

        At output level l the ratio is the learned weight of the
        highest-resolution term fused there divided by that of the
        lowest-resolution one: w(l-1) / w(l+1) inside the pyramid,
        w(0) / w(1) at the finest level, w(L-2) / w(L-1) at the coarsest.
        Above 1 the level leans toward finer features, below 1 toward
        coarser ones. With the 'paper' hard sigmoid a weight can be exactly
        0; the ratio is then ``inf`` (or ``nan`` for 0 / 0), not clipped.

        Args:
            block (int): 1-based block index.

        Returns:
            dict[int, Tensor]: Output level -> ratios, one per image seen.
        """
        if block not in self.weights:
            raise KeyError(
                f'no scale weights recorded for block {block}; '
                f'recorded: {sorted(self.weights)}.'
            )
        rec = self.weights[block]
        out = {}
        for level in sorted({lv for lv, _ in rec}):
            srcs = sorted(src for lv, src in rec if lv == level)
            if len(srcs) < 2:
                continue
            fine = torch.cat(rec[(level, srcs[0])])
            coarse = torch.cat(rec[(level, srcs[-1])])
            out[level] = fine / coarse
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
