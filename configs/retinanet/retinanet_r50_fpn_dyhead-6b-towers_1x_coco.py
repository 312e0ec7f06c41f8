# RetinaNet + DyHead as microsoft/DynamicHead released it (39.9 AP in its
# zoo, detectron2): 6 DyHead blocks after the FPN AND RetinaNet's four-conv
# towers. Not a paper row. Keeping the towers after DyHead is refused at
# build time unless asked for explicitly, which `dyhead_checks` does here.
_base_ = './retinanet_r50_fpn_dyhead-6b_1x_coco.py'

model = dict(
    bbox_head=dict(stacked_convs=4),
    dyhead_checks=dict(allow_head_towers=True))
