"""Matplotlib figures for paper Figures 3 and 4 (PNG, Agg backend)."""

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _pyplot():
    import matplotlib

    matplotlib.use('Agg')  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def activation_map(
    feat: Tensor, valid_hw: Tuple[int, int], out_hw: Tuple[int, int]
) -> np.ndarray:
    """Where a feature map responds: channel L2 norm, scaled to [0, 1].

    Args:
        feat (Tensor): One level of one image, (C, H, W).
        valid_hw (tuple[int, int]): The part of (H, W) covering the image;
            the rest is padding from the data preprocessor and is cut off
            so it does not take part in the normalisation.
        out_hw (tuple[int, int]): Size to resample the map to (the image's).

    Returns:
        np.ndarray: (out_h, out_w) float array in [0, 1].
    """
    energy = feat.float().norm(dim=0)[: valid_hw[0], : valid_hw[1]]
    energy = F.interpolate(
        energy[None, None], size=out_hw, mode='bilinear', align_corners=False
    )[0, 0]
    lo, hi = energy.min(), energy.max()
    return ((energy - lo) / (hi - lo).clamp_min(1e-12)).numpy()


def plot_feature_stages(
    image: np.ndarray,
    stages: Dict[int, Sequence[Tensor]],
    index: int,
    img_shape: Tuple[int, int],
    pad_shape: Tuple[int, int],
    out_file: str,
    levels: Optional[Sequence[int]] = None,
    title: str = '',
) -> None:
    """Paper Figure 4: activation maps before and after DyHead blocks.

    One row per pyramid level, one column per stage (the image, the neck
    input, then the selected blocks), maps overlaid on the image.

    Args:
        image (np.ndarray): The network's input image, RGB uint8
            (img_h, img_w, 3), i.e. resized like the model saw it.
        stages (dict[int, Sequence[Tensor]]): Stage -> L tensors
            (N, C, H_l, W_l); stage 0 = before the first block.
        index (int): Which image of the batch.
        img_shape (tuple[int, int]): (h, w) of the image inside the padded
            batch.
        pad_shape (tuple[int, int]): (H, W) of the padded batch.
        out_file (str): PNG path.
        levels (Sequence[int], optional): Levels to show; all by default.
        title (str): Figure title.
    """
    plt = _pyplot()
    order = sorted(stages)
    num_levels = len(stages[order[0]])
    levels = list(range(num_levels)) if levels is None else list(levels)
    h, w = img_shape
    fig, axes = plt.subplots(
        len(levels),
        len(order) + 1,
        squeeze=False,
        figsize=(2.2 * (len(order) + 1), 2.2 * len(levels) * h / w + 0.6),
    )
    for row, level in enumerate(levels):
        axes[row, 0].imshow(image)
        axes[row, 0].set_ylabel(f'level {level}')
        for col, stage in enumerate(order, start=1):
            feat = stages[stage][level][index]
            fh, fw = feat.shape[-2:]
            # Padding is at the bottom/right: keep the rows/cols that
            # cover the image.
            valid = (
                max(1, round(fh * h / pad_shape[0])),
                max(1, round(fw * w / pad_shape[1])),
            )
            axes[row, col].imshow(image)
            axes[row, col].imshow(
                activation_map(feat, valid, (h, w)),
                cmap='jet',
                alpha=0.5,
                vmin=0,
                vmax=1,
            )
            if row == 0:
                axes[row, col].set_title(
                    'before' if stage == 0 else f'block {stage}'
                )
    axes[0, 0].set_title('image')
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)


def plot_scale_ratio_histograms(
    ratios: Dict[int, Tensor], out_file: str, title: str = '', bins: int = 30
) -> None:
    """Paper Figure 3: histogram of learned scale ratios, one per level.

    Args:
        ratios (dict[int, Tensor]): Output level -> ratios (one per image),
            from :meth:`AttentionRecorder.scale_ratios`.
        out_file (str): PNG path.
        title (str): Figure title.
        bins (int): Histogram bins (log-spaced, shared by all levels).
    """
    plt = _pyplot()
    # A zero weight (possible with the 'paper' hard sigmoid) makes a ratio
    # 0 or inf, which a log axis cannot show; count them in the legend.
    finite = {lv: r[torch.isfinite(r) & (r > 0)] for lv, r in ratios.items()}
    values = torch.cat(list(finite.values()))
    if values.numel() == 0:
        raise ValueError('no finite, positive scale ratio to plot.')
    lo, hi = float(values.min()), float(values.max())
    if hi / lo < 1.01:  # all equal (e.g. untrained): widen to be visible
        lo, hi = lo / 1.05, hi * 1.05
    edges = np.geomspace(lo, hi, bins + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for level, r in sorted(finite.items()):
        dropped = len(ratios[level]) - len(r)
        label = f'level {level}' + (
            f' ({dropped} off-scale)' if dropped else ''
        )
        ax.hist(r.numpy(), bins=edges, alpha=0.55, label=label)
    ax.axvline(1.0, color='k', lw=0.8, ls='--')
    ax.set_xscale('log')
    ax.set_xlabel('scale ratio  w(higher resolution) / w(lower resolution)')
    ax.set_ylabel('images')
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
