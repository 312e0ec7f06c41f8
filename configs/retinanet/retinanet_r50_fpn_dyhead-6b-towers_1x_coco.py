# RetinaNet + DyHead as microsoft/DynamicHead released it (39.9 AP in its
# zoo, detectron2): 6 DyHead blocks after the FPN AND RetinaNet's four-conv
# towers. Not a paper row. DyHeadCheckHook refuses towers after DyHead unless
# asked for explicitly, which allow_head_towers does here.
_base_ = './retinanet_r50_fpn_dyhead-6b_1x_coco.py'

model = dict(bbox_head=dict(stacked_convs=4))
custom_hooks = [dict(type='DyHeadCheckHook', allow_head_towers=True)]
