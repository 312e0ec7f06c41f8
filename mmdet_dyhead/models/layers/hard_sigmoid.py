"""The two hard-sigmoid definitions in circulation for DyHead."""

import torch.nn as nn
from mmcv.cnn import build_activation_layer

from mmdet_dyhead.utils.misc import check_choice

HSIGMOID_STYLES = ('official', 'paper')


def check_hsigmoid_style(style: str) -> None:
    """Raise unless ``style`` is one of :data:`HSIGMOID_STYLES`."""
    check_choice(
        'hsigmoid',
        style,
        HSIGMOID_STYLES,
        "('official': relu6(x+3)/6 as in the released code and mmdet; "
        "'paper': max(0, min(1, (x+1)/2)) as in Eq. 3)",
    )


def build_hard_sigmoid(style: str) -> nn.Module:
    """``'official'``: relu6(x + 3) / 6; ``'paper'``: clamp((x + 1) / 2, 0, 1).

    Both are mmcv's ``HSigmoid`` with different bias/divisor, so the module
    (and its repr in configs and logs) is the one mmdet users know.
    """
    check_hsigmoid_style(style)
    if style == 'official':
        return build_activation_layer(
            dict(type='HSigmoid', bias=3.0, divisor=6.0)
        )
    return build_activation_layer(dict(type='HSigmoid', bias=1.0, divisor=2.0))
