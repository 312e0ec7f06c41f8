# The DyHead part of the two-stage DyHead configs (Faster, Mask and Cascade
# R-CNN): 6 blocks on the FPN's five 256-channel levels (P2-P6), and the
# hook that checks the wiring before training and testing. A detector
# config lists it next to its detector base and puts it after that base's
# FPN:
#
#     _base_ = ['./<detector>.py', '../_base_/dyhead-6b_neck.py']
#     model = dict(neck=[_base_.model.neck, _base_.dyhead_neck])
#
# The block is the variable ``dyhead_neck`` rather than ``model.neck``
# because mmengine refuses a key that two bases both define, and the
# detector base defines ``model``; it stays in the resolved config.
dyhead_neck = dict(
    type='DyHeadNeck',
    in_channels=256,
    out_channels=256,
    num_blocks=6,
    num_levels=5,
    preset='mmdet',
)

custom_hooks = [dict(type='DyHeadCheckHook')]
