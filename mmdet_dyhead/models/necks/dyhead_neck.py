"""The DyHead neck: N stacked blocks on an L-level feature pyramid."""

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmengine.model import BaseModule
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from mmdet_dyhead.registry import MODELS
from mmdet_dyhead.utils.misc import check_choice

from ..layers import BlockAttention, DynamicHeadBlock

# Named settings. Every key can still be overridden one by one.
DYHEAD_PRESETS = {
    # mmdet 3.3's DyHead, bit for bit (the default).
    'mmdet': dict(
        attention_order='spatial_first',
        hsigmoid='official',
        offset_mode='legacy',
        dcn_bias=False,
        init_style='mmdet',
        zero_init_offset=True,
    ),
    # microsoft/DynamicHead as released: DCN bias, PyTorch default init of
    # the offset conv and of the task-attention FCs.
    'official': dict(
        attention_order='spatial_first',
        hsigmoid='official',
        offset_mode='legacy',
        dcn_bias=True,
        init_style='official',
        zero_init_offset=False,
    ),
    # The paper's text: pi_L before pi_S (Eq. 2), sigma(x) = clamp((x+1)/2)
    # (Eq. 3), offsets aligned to the level they are applied on (Eq. 4).
    'paper': dict(
        attention_order='scale_first',
        hsigmoid='paper',
        offset_mode='aligned',
        dcn_bias=False,
        init_style='mmdet',
        zero_init_offset=True,
    ),
    # mmdet's settings with the high-branch offsets fixed (recommended for
    # new trainings; not loadable bit-exactly from released checkpoints).
    'aligned': dict(
        attention_order='spatial_first',
        hsigmoid='official',
        offset_mode='aligned',
        dcn_bias=False,
        init_style='mmdet',
        zero_init_offset=True,
    ),
}


def compile_modes() -> Tuple[str, ...]:
    """The ``mode`` values ``torch.compile`` accepts in this torch.

    ``torch.compile``'s docstring points to
    ``torch._inductor.list_mode_options()`` for them (its keys); the four
    the docstring lists are the fallback where that is missing.
    """
    try:
        from torch._inductor import list_mode_options
    except ImportError:
        return (
            'default',
            'reduce-overhead',
            'max-autotune',
            'max-autotune-no-cudagraphs',
        )
    return tuple(list_mode_options())


@MODELS.register_module()
class DyHeadNeck(BaseModule):
    """Dynamic Head as an mmdet neck (put it after ``FPN`` in ``neck=[...]``).

    With ``preset='mmdet'`` (default) it computes exactly what mmdet 3.3's
    ``DyHead`` computes and loads its checkpoints (keys renamed on load, see
    :mod:`mmdet_dyhead.models.key_mapping`).

    Args:
        in_channels (int | Sequence[int]): Channels of every input level
            (a sequence must hold one equal value per level).
        out_channels (int): Channels of every output level.
        num_blocks (int): Number of stacked blocks (paper Table 2). Default 6.
        num_levels (int, optional): If set, the number of pyramid levels the
            neck must receive; checked at every forward.
        preset (str): ``'mmdet'``, ``'official'``, ``'paper'`` or
            ``'aligned'``; see ``DYHEAD_PRESETS``. Explicit keyword arguments
            below override single entries.
        use_scale_attn, use_spatial_attn, use_task_attn (bool): switch each
            attention (paper Table 1).
        dcn_backend (str): ``'auto'`` or ``'torch'`` (the package's DCN
            operator: mmcv's kernel on CUDA, the compiled extension or
            pure PyTorch on CPU), or ``'mmcv'`` (mmcv's autograd function).
        with_cp (bool): Gradient checkpointing per block (less memory, one
            extra forward in backward).
        compile (bool | dict): Run the blocks through ``torch.compile``
            (``True``, or a dict of its options such as
            ``dict(mode='max-autotune')``). All blocks share one compiled
            function, so a 6-block neck compiles one block's graph (twice
            when the neck's inputs need no gradient: the first block then
            differs in that). Default False. Only ``forward`` is compiled,
            not :meth:`forward_with_attention`. See docs/benchmarks.md for
            compile times and speed.
        init_cfg (dict, optional): mmengine init config.
        **block_overrides: ``attention_order``, ``hsigmoid``, ``offset_mode``,
            ``dcn_bias``, ``init_style``, ``zero_init_offset``, ``norm_cfg``,
            ``task_attn_ratio``; see :class:`DynamicHeadBlock`.

    Shapes:
        input: tuple of L tensors (N, C_in, H_l, W_l), H_{l+1} = ceil(H_l / 2);
        output: tuple of L tensors (N, C_out, H_l, W_l).
    """

    def __init__(
        self,
        in_channels: Union[int, Sequence[int]],
        out_channels: int,
        num_blocks: int = 6,
        num_levels: Optional[int] = None,
        preset: str = 'mmdet',
        use_scale_attn: bool = True,
        use_spatial_attn: bool = True,
        use_task_attn: bool = True,
        dcn_backend: str = 'auto',
        with_cp: bool = False,
        compile: Union[bool, dict] = False,
        init_cfg: Optional[dict] = None,
        **block_overrides,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        if not isinstance(compile, (bool, dict)):
            raise TypeError(
                'DyHeadNeck compile must be True, False or a dict of '
                f'torch.compile options, got {compile!r}.'
            )
        check_choice('preset', preset, DYHEAD_PRESETS)
        if not isinstance(in_channels, int):
            in_channels = list(in_channels)
            if len(set(in_channels)) != 1:
                raise ValueError(
                    f'DyHeadNeck needs the same channel count on every level, '
                    f'got in_channels={in_channels}. Put an FPN (out_channels='
                    f'{max(in_channels)}) before it.'
                )
            if num_levels is None:
                num_levels = len(in_channels)
            elif num_levels != len(in_channels):
                raise ValueError(
                    f'in_channels lists {len(in_channels)} levels '
                    f'but num_levels={num_levels}.'
                )
            in_channels = in_channels[0]
        # bool is an int to Python, and '6' or 2.5 would fail later with a
        # bare TypeError that does not name the argument.
        if (
            isinstance(num_blocks, bool)
            or not isinstance(num_blocks, int)
            or num_blocks < 1
        ):
            raise ValueError(
                f'DyHeadNeck num_blocks must be a whole number >= 1 (the '
                f'paper uses 6), got {num_blocks!r}; set e.g. num_blocks=6 '
                f'in the config.'
            )
        unknown = (
            set(block_overrides)
            - set(DYHEAD_PRESETS['mmdet'])
            - {'norm_cfg', 'task_attn_ratio'}
        )
        if unknown:
            raise TypeError(
                f'DyHeadNeck got unknown arguments {sorted(unknown)}.'
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_blocks = num_blocks
        self.num_levels = num_levels
        self.preset = preset
        self.with_cp = with_cp
        self.compile_cfg = compile
        # One compiled function of the block class, not one per block:
        # torch.compile caches per code object, and with the block as an
        # argument its parameters are graph inputs, so every block of the
        # same structure and input shapes reuses one graph. (Compiled
        # blocks run no module hooks; eager ones are called as modules.)
        self._block_forward = None
        if compile:
            options = {} if compile is True else dict(compile)
            if options.get('mode') is not None:
                # Only the inductor backend reads the mode; others would
                # ignore a misspelt one without a word.
                check_choice(
                    'DyHeadNeck compile mode',
                    options['mode'],
                    compile_modes(),
                )
            self._block_forward = torch.compile(
                DynamicHeadBlock.forward, **options
            )
        block_cfg = dict(DYHEAD_PRESETS[preset], **block_overrides)
        self.block_cfg = block_cfg
        self.dyhead_blocks = nn.Sequential(
            *[
                DynamicHeadBlock(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    use_scale_attn=use_scale_attn,
                    use_spatial_attn=use_spatial_attn,
                    use_task_attn=use_task_attn,
                    dcn_backend=dcn_backend,
                    **block_cfg,
                )
                for i in range(num_blocks)
            ]
        )

    def _check_inputs(self, inputs: Sequence[Tensor]) -> None:
        if not isinstance(inputs, (list, tuple)) or not inputs:
            raise ValueError(
                'DyHeadNeck expects a tuple of pyramid levels '
                f'(N, C, H, W), got {type(inputs).__name__}.'
            )
        if self.num_levels is not None and len(inputs) != self.num_levels:
            raise ValueError(
                f'DyHeadNeck was built for {self.num_levels} levels but got '
                f'{len(inputs)}; make FPN num_outs and DyHeadNeck num_levels '
                f'agree (and the head strides).'
            )
        for i, feat in enumerate(inputs):
            if feat.dim() != 4 or feat.shape[1] != self.in_channels:
                raise ValueError(
                    f'DyHeadNeck level {i} has shape {tuple(feat.shape)} but '
                    f'in_channels={self.in_channels}; set DyHeadNeck '
                    f'in_channels to the FPN out_channels.'
                )
        # Compared pairwise, not as a set: while tracing, sizes are tensors.
        sizes = [feat.shape[0] for feat in inputs]
        if any(size != sizes[0] for size in sizes[1:]):
            # Each level's offsets would be applied to another level's
            # images; the DCN would only fail later, on a shape.
            raise ValueError(
                f'DyHeadNeck levels have batch sizes '
                f'{[int(size) for size in sizes]}; every level '
                f'must hold the same N images (the levels of one pyramid, '
                f'e.g. one FPN output).'
            )
        for i in range(1, len(inputs)):
            prev, cur = inputs[i - 1].shape[-2:], inputs[i].shape[-2:]
            want = (math.ceil(prev[0] / 2), math.ceil(prev[1] / 2))
            if tuple(cur) != want:
                raise ValueError(
                    f'DyHeadNeck level {i} is {tuple(cur)} but level {i - 1} '
                    f'is {tuple(prev)}; DyHead mixes neighbouring levels with '
                    f'stride-2 convolutions, so each level must be '
                    f'ceil(previous / 2) = {want}. Feed consecutive pyramid '
                    f'levels (strides doubling, e.g. FPN outputs in order).'
                )

    def forward(self, inputs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        """Args: inputs: L tensors (N, C_in, H_l, W_l).

        Returns: L tensors (N, C_out, H_l, W_l).
        """
        self._check_inputs(inputs)
        if inputs[0].shape[0] == 0:
            return self._empty_outputs(inputs)
        feats = list(inputs)
        compiled = self._block_forward

        def run(block, feats):
            return block(feats) if compiled is None else compiled(block, feats)

        for block in self.dyhead_blocks:
            if self.with_cp and any(f.requires_grad for f in feats):
                feats = checkpoint(
                    lambda *fs, b=block: tuple(run(b, list(fs))),
                    *feats,
                    use_reentrant=False,
                )
                feats = list(feats)
            else:
                feats = run(block, feats)
        return tuple(feats)

    def _empty_outputs(self, inputs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        """What the blocks return for an empty batch (N = 0), whose
        reshapes cannot infer a size from zero elements: empty levels of
        ``out_channels``. As torch's convolutions do for an empty batch,
        the outputs depend on the inputs and the parameters (gradients of
        zero), so that a backward through them still reaches every
        parameter (DDP expects that)."""
        zero = sum(f.sum() for f in inputs)
        zero = zero + sum(p.sum() for p in self.parameters())
        return tuple(
            f.new_zeros((0, self.out_channels, *f.shape[-2:])) + zero * 0
            for f in inputs
        )

    def forward_with_attention(
        self, inputs: Sequence[Tensor]
    ) -> Tuple[Tuple[Tensor, ...], List[BlockAttention]]:
        """The outputs of :meth:`forward` and every block's attentions.

        Runs each block's
        :meth:`~mmdet_dyhead.models.layers.DynamicHeadBlock.forward_with_attention`,
        the computation its ``forward`` runs, so the outputs equal
        :meth:`forward`'s bit for bit (without gradient checkpointing,
        which changes memory, not values).

        Args:
            inputs (Sequence[Tensor]): L tensors (N, C_in, H_l, W_l).

        Returns:
            tuple: The L output tensors (N, C_out, H_l, W_l) and one
            :class:`~mmdet_dyhead.models.layers.BlockAttention` per block,
            in order. Block k's ``inputs`` is the neck input for k = 0 and
            block k - 1's ``outputs`` otherwise (paper Figure 4's stages).
        """
        self._check_inputs(inputs)
        feats = list(inputs)
        attentions = []
        for block in self.dyhead_blocks:
            feats, attention = block.forward_with_attention(feats)
            attentions.append(attention)
        return tuple(feats), attentions
