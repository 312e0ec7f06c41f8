# Mask R-CNN + DyHead in the paper's two-stage form (Fig. 2c; the paper
# shows it for Faster R-CNN only): 6 DyHead blocks with scale- and
# spatial-aware attention on the pyramid (P2-P6) before RoI pooling, and
# task-aware attention in place of the two FC layers of the box head
# (TaskAttnBBoxHead, as in ../faster_rcnn/). RPN and both RoI extractors
# read the attended pyramid.
#
# The mask head stays mmdet's FCNMaskHead (4 convs + deconv on 14x14 RoIs):
# Fig. 2c puts task-aware attention where the box head's FC layers were,
# and the mask head has none; its convs keep the spatial layout a 28x28
# mask needs, and task-aware attention is a per-channel activation that
# would add to them rather than replace anything. Keeping it unchanged
# also keeps the comparison with the baseline to the two DyHead changes.
#
# Everything else is the DyHead-neck sibling's: the two configs differ in
# the neck's task-aware attention and the box head's type.
_base_ = './mask-rcnn_r50_fpn_dyhead-6b_1x_coco.py'

dyhead_neck = dict(_base_.dyhead_neck, use_task_attn=False)
model = dict(
    neck=[_base_.model.neck[0], dyhead_neck],
    # Shared2FCBBoxHead's settings stay (classes, coder, losses); its two
    # FC layers become two task-aware attentions, and fc_out_channels=None
    # lets the predictors read the attended RoI directly.
    roi_head=dict(
        bbox_head=dict(
            type='TaskAttnBBoxHead', num_task_attn=2, fc_out_channels=None
        )
    ),
)
