# Cascade R-CNN + DyHead in the paper's two-stage form (Fig. 2c; the paper
# shows it for Faster R-CNN only): 6 DyHead blocks with scale- and
# spatial-aware attention on the pyramid (P2-P6) before RoI pooling, and in
# each of the three cascade stages task-aware attention in place of the two
# FC layers of the box head (TaskAttnBBoxHead, as in ../faster_rcnn/). The
# stages keep what mmdet's Cascade R-CNN gives them: their own regression
# target stds, class-agnostic regression, SmoothL1 loss, IoU thresholds and
# loss weights (1, 0.5, 0.25). RPN and RoIAlign read the attended pyramid.
#
# Everything else is the DyHead-neck sibling's: the two configs differ in
# the neck's task-aware attention and the box heads' type.
_base_ = './cascade-rcnn_r50_fpn_dyhead-6b_1x_coco.py'

dyhead_neck = dict(_base_.dyhead_neck, use_task_attn=False)
model = dict(
    neck=[_base_.model.neck[0], dyhead_neck],
    # A list replaces the base's list as a whole: each stage is the base's
    # Shared2FCBBoxHead dict with its two FC layers turned into two
    # task-aware attentions (fc_out_channels=None: the predictors read the
    # attended RoI directly).
    roi_head=dict(
        bbox_head=[
            dict(
                stage,
                type='TaskAttnBBoxHead',
                num_task_attn=2,
                fc_out_channels=None,
            )
            for stage in _base_.model.roi_head.bbox_head
        ]
    ),
)
