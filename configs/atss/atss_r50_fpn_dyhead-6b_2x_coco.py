# ATSS R-50 + 6 DyHead blocks on the 2x schedule (24 epochs, steps at 16 and
# 22 as in mmdet's schedule_2x). The paper trains its non-ablation models
# "with the standard 2x configuration" (Sec. 4.1); its Table 4 R-50 row is
# 1x, so this config has no paper number. The 1x/2x twin of the R-101 and
# X-101 rows of Table 4.
_base_ = './atss_r50_fpn_dyhead-6b_1x_coco.py'

max_epochs = 24
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500
    ),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[16, 22],
        gamma=0.1,
    ),
]
