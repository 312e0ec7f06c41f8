"""Recording DyHead features and scale-aware weights for the paper's plots.

The blocks record through their own switch (``record_attention``, see
:class:`~mmdet_dyhead.models.layers.DynamicHeadBlock`): each forward then
keeps references to what it computed anyway, and its outputs are the same
with the switch on or off. :class:`AttentionRecorder` sets the switch for
the blocks of one neck (or one block), reads the records after each forward
and turns it off again.
"""

from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from mmdet_dyhead.utils.misc import check_choice


def find_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Modules the visualisation tools can record, by qualified name.

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
    check_choice('layer', name, layers)
    return name, layers[name]


def _to_cpu(tensors) -> List[Tensor]:
    return [t.detach().float().cpu() for t in tensors]


class AttentionRecorder:
    """What a ``DyHeadNeck``'s blocks (or one block) compute, per forward.

    Use it as a context manager around the forwards of the model that holds
    the module, and call :meth:`collect` after each forward::

        with AttentionRecorder(neck) as rec, torch.no_grad():
            for images in batches:
                model.extract_feat(images)
                rec.collect()
        rec.stages            # the last forward's features (Figure 4)
        rec.scale_ratios(6)   # block 6's ratios over all forwards (Fig. 3)

    Args:
        module (nn.Module): A ``DyHeadNeck`` (all its blocks) or one
            ``DynamicHeadBlock``.

    Attributes:
        stages (dict[int, list[Tensor]]): From the latest :meth:`collect`:
            stage 0 is the first block's input (the neck input, "before"),
            stage k the output of block k (1-based, as the paper counts
            blocks); L tensors (N, C, H_l, W_l) each, on CPU in float32.
        scale_weights (dict): ``scale_weights[block][(out_level,
            src_level)]`` is a list of (N,) tensors, one per
            :meth:`collect`: pi_L's weight of the term read from
            ``src_level`` and fused at ``out_level`` (Eq. 3). Blocks
            without scale attention have no entry.
    """

    def __init__(self, module: nn.Module) -> None:
        blocks = getattr(module, 'dyhead_blocks', None)
        self.blocks = list(blocks) if blocks is not None else [module]
        self.stages: Dict[int, List[Tensor]] = {}
        self.scale_weights = defaultdict(lambda: defaultdict(list))
        for block in self.blocks:
            block.record_attention = True
            block.last_attention = None

    def collect(self) -> None:
        """Read what the blocks recorded in the forward that just ran.

        Raises:
            RuntimeError: A block ran no forward since the last call (or
                since the recorder started).
        """
        records = []
        for k, block in enumerate(self.blocks, start=1):
            if block.last_attention is None:
                raise RuntimeError(
                    f'block {k} recorded nothing: run a forward of the '
                    f'model between two collect() calls.'
                )
            records.append(block.last_attention)
            # Each forward is read once; a second collect() without a
            # forward in between raises instead of counting it twice.
            block.last_attention = None
        self.stages = {0: _to_cpu(records[0].inputs)}
        for k, record in enumerate(records, start=1):
            self.stages[k] = _to_cpu(record.outputs)
            for key, w in record.scale_weights.items():
                self.scale_weights[k][key].append(
                    w.detach().float().cpu().flatten()
                )

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
        if block not in self.scale_weights:
            raise KeyError(
                f'no scale weights recorded for block {block}; '
                f'recorded: {sorted(self.scale_weights)}.'
            )
        rec = self.scale_weights[block]
        out = {}
        for level in sorted({lv for lv, _ in rec}):
            srcs = sorted(src for lv, src in rec if lv == level)
            if len(srcs) < 2:
                continue
            fine = torch.cat(rec[(level, srcs[0])])
            coarse = torch.cat(rec[(level, srcs[-1])])
            out[level] = fine / coarse
        return out

    def close(self) -> None:
        """Turn the blocks' recording off and drop what they hold."""
        for block in self.blocks:
            block.record_attention = False
            block.last_attention = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
