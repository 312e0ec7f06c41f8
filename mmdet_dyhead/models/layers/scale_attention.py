"""Scale-aware attention pi_L (paper Eq. 3)."""

import torch.nn as nn
from torch import Tensor

from .hard_sigmoid import build_hard_sigmoid, check_hsigmoid_style


class ScaleAwareAttention(nn.Module):
    """Scale-aware attention, Eq. 3: ``pi_L(F) = sigma(f(mean_S F))``.

    One scalar per sample and pyramid term says how much that level
    contributes to the fused feature. ``f`` is a shared 1x1 conv (C -> 1).
    As in the released code (and mmdet), the mean runs over space only and
    ``f`` reads the channel vector; the paper's text averages over S and C.

    ``hsigmoid='official'`` puts a ReLU before relu6(x+3)/6, so weights lie in
    [0.5, 1] and start at 0.5 (the released code); ``'paper'`` is Eq. 3's
    sigma(x) = max(0, min(1, (x+1)/2)) with no ReLU, weights in [0, 1].

    Args:
        channels (int): Channels C of the feature the weight is computed from.
        hsigmoid (str): ``'official'`` or ``'paper'``.

    Shapes:
        input: (N, C, H, W); output: (N, 1, 1, 1), the weight (not the
        weighted feature, so callers can reuse one weight for several terms).
    """

    def __init__(self, channels: int, hsigmoid: str = 'official') -> None:
        super().__init__()
        check_hsigmoid_style(hsigmoid)
        self.hsigmoid_style = hsigmoid
        self.fc = nn.Conv2d(channels, 1, 1)
        self.relu = (
            nn.ReLU(inplace=True) if hsigmoid == 'official' else nn.Identity()
        )
        self.hsigmoid = build_hard_sigmoid(hsigmoid)

    def forward(self, x: Tensor) -> Tensor:
        return self.from_pooled(x.mean(dim=(2, 3), keepdim=True))

    def from_pooled(self, pooled: Tensor) -> Tensor:
        """The weight from an already pooled feature (N, C, 1, 1).

        Lets a caller that needs the spatial mean anyway (the block reuses
        it for the task attention's pooling) pool only once.
        """
        return self.hsigmoid(self.relu(self.fc(pooled)))
