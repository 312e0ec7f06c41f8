"""Task-aware attention pi_C (paper Eq. 5)."""
import torch
import torch.nn as nn
from torch import Tensor

from mmdet_dyhead.registry import MODELS
from .hard_sigmoid import build_hard_sigmoid


@MODELS.register_module()
class TaskAwareAttention(nn.Module):
    """Task-aware attention, Eq. 5: a dynamic ReLU per channel.

    ``out_c = max(a1_c * F_c + b1_c, a2_c * F_c + b2_c)`` where
    ``[a1, a2, b1, b2] = theta(F)``; theta is global average pooling, two fully
    connected layers (1x1 convs here, C -> C/ratio -> 4C) and a hard sigmoid
    shifted to [-0.5, 0.5]. Then ``a1 = 2y + 1`` (in [0, 2], starts at 1),
    ``a2 = 2y`` (in [-1, 1]), ``b = y`` (in [-0.5, 0.5]); with all-zero
    logits this is a plain ReLU. This is DyReLU-B (K=2), as in the released
    code and mmdet's ``DyReLU``; the paper's text also names a normalisation
    layer inside theta, which no release has.

    Args:
        channels (int): Channels C of the feature.
        ratio (int): Squeeze ratio of the first FC. Default: 4.
        hsigmoid (str): ``'official'`` (relu6(x+3)/6) or ``'paper'``
            (clamp((x+1)/2, 0, 1)).

    Shapes:
        input and output: (N, C, H, W).
    """

    def __init__(self, channels: int, ratio: int = 4,
                 hsigmoid: str = 'official') -> None:
        super().__init__()
        self.channels = channels
        self.fc1 = nn.Conv2d(channels, int(channels / ratio), 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(int(channels / ratio), channels * 4, 1)
        self.hsigmoid = build_hard_sigmoid(hsigmoid)

    def coefficients(self, x: Tensor):
        """theta(F): returns a1, b1, a2, b2, each (N, C, 1, 1)."""
        return self.coefficients_from_pooled(x.mean(dim=(2, 3), keepdim=True))

    def coefficients_from_pooled(self, pooled: Tensor):
        """theta from the spatial mean of F, (N, C, 1, 1)."""
        y = self.hsigmoid(self.fc2(self.relu(self.fc1(pooled)))) - 0.5
        a1, b1, a2, b2 = torch.split(y, self.channels, dim=1)
        return a1 * 2.0 + 1.0, b1, a2 * 2.0, b2

    @staticmethod
    def apply_coefficients(x: Tensor, a1: Tensor, b1: Tensor, a2: Tensor,
                           b2: Tensor) -> Tensor:
        """Eq. 5: the larger of two learned linear pieces, per channel."""
        # addcmul: one pass per piece instead of a multiply and an add.
        return torch.maximum(torch.addcmul(b1, x, a1), torch.addcmul(b2, x, a2))

    def forward(self, x: Tensor) -> Tensor:
        return self.apply_coefficients(x, *self.coefficients(x))
