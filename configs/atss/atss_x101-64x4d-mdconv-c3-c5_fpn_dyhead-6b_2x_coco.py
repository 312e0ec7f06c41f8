# ATSS + 6 DyHead blocks, ResNeXt-101 64x4d with modulated deformable convs
# (DCNv2) in stages c3-c5, 2x, single-scale training: the backbone of the
# paper's Table 5 without its multi-scale training (no paper number). The
# paper only says "ResNeXt-64x4d-101-DCN"; modulated DCN in c3-c5 (mmdet's
# "mdconv-c3-c5") is our assumption.
_base_ = './atss_x101-64x4d_fpn_dyhead-6b_2x_coco.py'

model = dict(
    backbone=dict(
        dcn=dict(type='DCNv2', deform_groups=1, fallback_on_stride=False),
        stage_with_dcn=(False, True, True, True),
    )
)
