# Table 3 "Faster R-CNN + DyHead" (paper 38.9), the paper's two-stage design
# (Fig. 2c): 6 DyHead blocks with scale- and spatial-aware attention only on
# the pyramid (P2-P6) before RoI pooling, and task-aware attention in place
# of the two FC layers of the box head (TaskAttnBBoxHead). RPN and RoIAlign
# read the attended pyramid. The paper does not say how many blocks it used
# here; 6 is its default.
#
# Everything else is the DyHead-neck sibling's: the two configs differ in
# the neck's task-aware attention and the box head's type.
_base_ = './faster-rcnn_r50_fpn_dyhead-6b_1x_coco.py'

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
