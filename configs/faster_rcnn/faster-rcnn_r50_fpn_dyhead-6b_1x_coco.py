# Faster R-CNN + DyHead as microsoft/DynamicHead released it (40.3 AP in its
# zoo, detectron2; the paper's Fig. 2c design gave 38.9): the full DyHead
# (all three attentions, 6 blocks) on P2-P6 before an unchanged RPN and
# Shared2FCBBoxHead. Not a paper row.
_base_ = ['./faster-rcnn_r50_fpn_1x_coco.py', '../_base_/dyhead-6b_neck.py']

# The base's FPN, then DyHead (a list replaces the base's neck as a whole).
model = dict(neck=[_base_.model.neck, _base_.dyhead_neck])
