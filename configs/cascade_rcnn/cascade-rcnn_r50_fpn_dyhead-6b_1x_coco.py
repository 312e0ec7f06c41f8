# Cascade R-CNN + DyHead as a neck (not a paper row): the full DyHead (all
# three attentions, 6 blocks; the block of ../faster_rcnn/) on P2-P6 after
# the FPN, before an unchanged RPN and the three unchanged
# Shared2FCBBoxHead stages.
_base_ = ['./cascade-rcnn_r50_fpn_1x_coco.py', '../_base_/dyhead-6b_neck.py']

# The base's FPN, then DyHead (a list replaces the base's neck as a whole).
model = dict(neck=[_base_.model.neck, _base_.dyhead_neck])
