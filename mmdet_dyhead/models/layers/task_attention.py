"""Task-aware attention pi_C (paper Eq. 5)."""

import torch
import torch.nn as nn
from torch import Tensor
from torch.autograd.function import once_differentiable

from mmdet_dyhead.ops import exporting

from .hard_sigmoid import build_hard_sigmoid


class TwoPieceMaxFunction(torch.autograd.Function):
    """``max(a1 * x + b1, a2 * x + b2)`` (Eq. 5) that saves only its inputs.

    Autograd of the plain expression keeps both pieces (two maps the size
    of ``x``) for ``maximum``'s backward and allocates several more in it;
    here the backward recomputes the pieces from ``x`` and the (N, C, 1, 1)
    coefficients. Gradients equal ``torch.maximum``'s, ties included (each
    piece gets half).
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor
    ) -> Tensor:
        ctx.save_for_backward(x, a1, b1, a2, b2)
        out = torch.addcmul(b1, x, a1)
        return torch.maximum(out, torch.addcmul(b2, x, a2), out=out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, a1, b1, a2, b2 = ctx.saved_tensors
        piece1 = torch.addcmul(b1, x, a1)
        piece2 = torch.addcmul(b2, x, a2)
        # Share of the gradient that goes to piece 1: all, half on ties, none.
        grad1 = torch.where(piece1 > piece2, grad, 0.0)
        ties = piece1 == piece2
        del piece1, piece2
        if ties.any():
            grad1 = torch.where(ties, grad * 0.5, grad1)
        del ties
        grad2 = grad - grad1
        need = ctx.needs_input_grad
        grad_x = (
            (grad1 * a1).addcmul_(grad2, a2).to(x.dtype) if need[0] else None
        )

        def reduce(t, like):
            return t.sum_to_size(like.shape).to(like.dtype)

        return (
            grad_x,
            reduce(grad1 * x, a1) if need[1] else None,
            reduce(grad1, b1) if need[2] else None,
            reduce(grad2 * x, a2) if need[3] else None,
            reduce(grad2, b2) if need[4] else None,
        )


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

    def __init__(
        self, channels: int, ratio: int = 4, hsigmoid: str = 'official'
    ) -> None:
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
    def apply_coefficients(
        x: Tensor, a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor
    ) -> Tensor:
        """Eq. 5: the larger of two learned linear pieces, per channel.

        Args:
            x (Tensor): (N, C, H, W).
            a1, b1, a2, b2 (Tensor): (N, C, 1, 1) each.
        """
        if exporting():
            # Exporters trace plain ops; the function's maximum(out=) and
            # addcmul have no ONNX symbolic.
            return torch.maximum(x * a1 + b1, x * a2 + b2)
        return TwoPieceMaxFunction.apply(x, a1, b1, a2, b2)

    def forward(self, x: Tensor) -> Tensor:
        return self.apply_coefficients(x, *self.coefficients(x))
