# Table 1 "L C": ATSS R-50 1x, 6 DyHead blocks with only scale- and task-aware
# attention (L, C) on.
# A block without spatial-aware attention mixes the levels with plain 3x3
# convs; without scale-aware attention the level terms are averaged
# unweighted; without task-aware attention its output is the fused feature.
_base_ = './atss_r50_fpn_dyhead-6b_1x_coco.py'

model = dict(
    neck=[
        _base_.model.neck[0],
        dict(
            _base_.model.neck[1],
            use_scale_attn=True,
            use_spatial_attn=False,
            use_task_attn=True,
        ),
    ]
)
