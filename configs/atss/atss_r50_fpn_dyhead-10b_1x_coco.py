# Table 2 "10 blocks": ATSS R-50 1x with 10 stacked DyHead blocks; all else
# as in ./atss_r50_fpn_dyhead-6b_1x_coco.py.
_base_ = './atss_r50_fpn_dyhead-6b_1x_coco.py'

model = dict(
    neck=[
        _base_.model.neck[0],
        dict(_base_.model.neck[1], num_blocks=10),
    ]
)
