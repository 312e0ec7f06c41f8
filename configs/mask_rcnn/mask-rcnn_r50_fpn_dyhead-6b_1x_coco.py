# Mask R-CNN + DyHead as a neck (not a paper row): the full DyHead (all
# three attentions, 6 blocks) on P2-P6 after the FPN, before an unchanged
# RPN, Shared2FCBBoxHead and FCNMaskHead; the way microsoft/DynamicHead's
# Faster R-CNN variant was built (../faster_rcnn/..._dyhead-6b_1x_coco.py,
# the same DyHead block), applied to Mask R-CNN. Both RoI extractors read
# the attended pyramid.
_base_ = ['./mask-rcnn_r50_fpn_1x_coco.py', '../_base_/dyhead-6b_neck.py']

# The base's FPN, then DyHead (a list replaces the base's neck as a whole).
model = dict(neck=[_base_.model.neck, _base_.dyhead_neck])
