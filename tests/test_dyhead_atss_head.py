"""DyHeadATSSHead: mmdet's ATSSHead, or the DyHead release's pre-NMS ranking.

The release (microsoft/DynamicHead, ``extra/atss.py``, inference per level)
keeps the (location, class) pairs whose class probability exceeds the score
threshold, multiplies each by its location's centerness probability (no
square root), keeps the ``nms_pre`` largest products and hands the products
to NMS. The reference below is those steps written out in numpy.
"""

import numpy as np
import pytest
import torch
from mmdet.models.dense_heads import ATSSHead
from mmdet.utils import register_all_modules
from mmengine.config import ConfigDict

from mmdet_dyhead.models.dense_heads import DyHeadATSSHead
from mmdet_dyhead.registry import MODELS

NUM_CLASSES = 3
STRIDES = (8, 16, 32)
IMG = (64, 64)


def head_cfg(head_type, **extra):
    # Anchors of one stride's size: neighbours touch but do not overlap,
    # so NMS keeps every kept candidate and the top-k choice is what shows.
    return dict(
        type=head_type,
        num_classes=NUM_CLASSES,
        in_channels=8,
        feat_channels=8,
        stacked_convs=0,
        pred_kernel_size=1,
        anchor_generator=dict(
            type='AnchorGenerator',
            ratios=[1.0],
            octave_base_scale=1,
            scales_per_octave=1,
            strides=list(STRIDES),
            center_offset=0.5,
        ),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder',
            target_means=[0.0, 0.0, 0.0, 0.0],
            target_stds=[0.1, 0.1, 0.2, 0.2],
        ),
        test_cfg=dict(
            nms_pre=5,
            min_bbox_size=0,
            score_thr=0.05,
            nms=dict(type='nms', iou_threshold=0.6),
            max_per_img=100,
        ),
        **extra,
    )


def build(head_type, **extra):
    register_all_modules()
    return MODELS.build(head_cfg(head_type, **extra))


def metas(n):
    return [
        dict(img_shape=IMG, ori_shape=IMG, scale_factor=(1.0, 1.0))
        for _ in range(n)
    ]


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float32)
    return torch.log(p) - torch.log1p(-p)


def random_inputs(seed, images=2):
    g = torch.Generator().manual_seed(seed)
    sizes = [(IMG[0] // s, IMG[1] // s) for s in STRIDES]
    cls = [
        torch.randn(images, NUM_CLASSES, h, w, generator=g) for h, w in sizes
    ]
    reg = [torch.randn(images, 4, h, w, generator=g) * 0.3 for h, w in sizes]
    ctr = [torch.randn(images, 1, h, w, generator=g) * 2 for h, w in sizes]
    return cls, reg, ctr


def predict(head, cls, reg, ctr, with_nms=True):
    return head.predict_by_feat(
        cls,
        reg,
        score_factors=ctr,
        batch_img_metas=metas(cls[0].shape[0]),
        cfg=ConfigDict(head.test_cfg),
        rescale=False,
        with_nms=with_nms,
    )


def release_reference(head, cls, reg, ctr, image):
    """The release's inference steps for one image, before NMS.

    Returns:
        list[tuple]: (level, location, class, score) of every kept
        candidate; score is class probability x centerness probability.
    """
    nms_pre, thr = head.test_cfg['nms_pre'], head.test_cfg['score_thr']
    kept = []
    for level, (c, t) in enumerate(zip(cls, ctr)):
        logits = c[image].permute(1, 2, 0).reshape(-1, NUM_CLASSES).numpy()
        centers = t[image].permute(1, 2, 0).reshape(-1).numpy()
        prob = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        centerness = 1.0 / (1.0 + np.exp(-centers.astype(np.float64)))
        loc, label = np.nonzero(prob > thr)  # threshold on the class alone
        product = prob[loc, label] * centerness[loc]
        top = np.argsort(-product, kind='stable')[: min(nms_pre, len(loc))]
        kept += [
            (level, int(loc[i]), int(label[i]), float(product[i])) for i in top
        ]
    return kept


def boxes_of(head, kept, reg, image):
    """Decoded box of each (level, location) of ``kept``."""
    sizes = [r.shape[-2:] for r in reg]
    priors = head.prior_generator.grid_priors(sizes, device='cpu')
    out = []
    for level, loc, _, _ in kept:
        delta = reg[level][image].permute(1, 2, 0).reshape(-1, 4)[loc]
        out.append(
            head.bbox_coder.decode(
                priors[level][loc][None], delta[None], max_shape=IMG
            )[0]
        )
    return torch.stack(out)


def as_rows(result):
    rows = torch.cat(
        [result.bboxes, result.scores[:, None], result.labels[:, None]], 1
    )
    return rows[torch.argsort(result.scores, descending=True)]


def test_default_is_bit_identical_to_mmdets_atss_head():
    ours, theirs = build('DyHeadATSSHead'), build('ATSSHead')
    assert type(theirs) is ATSSHead and type(ours) is DyHeadATSSHead
    assert ours.nms_pre_rank == 'cls'
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for seed in range(3):
        inputs = random_inputs(seed)
        for with_nms in (True, False):
            for a, b in zip(
                predict(ours, *inputs, with_nms=with_nms),
                predict(theirs, *inputs, with_nms=with_nms),
            ):
                assert torch.equal(a.bboxes, b.bboxes)
                assert torch.equal(a.scores, b.scores)
                assert torch.equal(a.labels, b.labels)


def test_crafted_case_keeps_what_the_release_keeps():
    """One class, one level of four locations, nms_pre 2: class scores
    0.9 0.8 0.6 0.5 with centerness 0.1 0.2 0.9 0.95. mmdet keeps the first
    two (products 0.09 and 0.16); the release the last two (0.54, 0.475)."""
    prob = torch.tensor([0.9, 0.8, 0.6, 0.5])
    centerness = torch.tensor([0.1, 0.2, 0.9, 0.95])
    cls = [logit(prob).reshape(1, 1, 2, 2).repeat(1, NUM_CLASSES, 1, 1)]
    cls[0][:, 1:] = -20.0  # classes 1 and 2 never pass score_thr
    ctr = [logit(centerness).reshape(1, 1, 2, 2)]
    reg = [torch.zeros(1, 4, 2, 2)]
    cfg = dict(anchor_generator=dict(strides=[32]), test_cfg=dict(nms_pre=2))

    def one_level(head_type, **extra):
        c = head_cfg(head_type, **extra)
        c['anchor_generator'].update(cfg['anchor_generator'])
        c['test_cfg'].update(cfg['test_cfg'])
        register_all_modules()
        return MODELS.build(c)

    release = one_level('DyHeadATSSHead', nms_pre_rank='cls_x_centerness')
    mmdet = one_level('ATSSHead')
    (got,) = predict(release, cls, reg, ctr)
    (old,) = predict(mmdet, cls, reg, ctr)
    # Zero deltas: each box is its anchor, 32 px at (i + 0.5) * 32.
    anchors = torch.tensor(
        [[0, 0, 32, 32], [32, 0, 64, 32], [0, 32, 32, 64], [32, 32, 64, 64]],
        dtype=torch.float32,
    )
    torch.testing.assert_close(got.scores, torch.tensor([0.54, 0.475]))
    torch.testing.assert_close(got.bboxes, anchors[[2, 3]])
    torch.testing.assert_close(old.scores, torch.tensor([0.16, 0.09]))
    torch.testing.assert_close(old.bboxes, anchors[[1, 0]])
    assert got.labels.tolist() == old.labels.tolist() == [0, 0]

    # The threshold is on the class score alone, as in the release: 0.06 x
    # 0.5 = 0.03 is kept, 0.04 x 0.99 is not; and below nms_pre all stay.
    cls[0][0, 0] = logit([[0.06, 0.04], [0.01, 0.01]])
    ctr[0][0, 0] = logit([[0.5, 0.99], [0.5, 0.5]])
    (got,) = predict(release, cls, reg, ctr)
    torch.testing.assert_close(got.scores, torch.tensor([0.03]))
    torch.testing.assert_close(got.bboxes, anchors[[0]])


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_random_inputs_match_the_release_equations(seed):
    head = build('DyHeadATSSHead', nms_pre_rank='cls_x_centerness')
    mmdet = build('ATSSHead')
    cls, reg, ctr = random_inputs(seed)
    results = predict(head, cls, reg, ctr, with_nms=False)
    differs = False
    for image, result in enumerate(results):
        kept = release_reference(head, cls, reg, ctr, image)
        want = torch.cat(
            [
                boxes_of(head, kept, reg, image),
                torch.tensor([[k[3], k[2]] for k in kept]),
            ],
            1,
        )
        want = want[torch.argsort(want[:, 4], descending=True)]
        got = as_rows(result)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        old = as_rows(predict(mmdet, cls, reg, ctr, with_nms=False)[image])
        differs |= old.shape != got.shape or not torch.allclose(old, got)
    # The inputs are ones where the two rankings keep different candidates.
    assert differs
    # After NMS the scores are the products, as the release hands them on.
    for result in predict(head, cls, reg, ctr):
        assert result.scores.numel() > 0
        assert torch.all(result.scores[:-1] >= result.scores[1:])


def test_unknown_ranking_is_refused():
    with pytest.raises(ValueError, match='nms_pre_rank'):
        build('DyHeadATSSHead', nms_pre_rank='centerness')


def test_only_the_official_config_ranks_as_the_release():
    import glob
    import os.path as osp

    from tests.helpers import REPO_ROOT

    users = sorted(
        osp.basename(p)
        for p in glob.glob(
            osp.join(REPO_ROOT, 'configs', '**', '*.py'), recursive=True
        )
        if 'DyHeadATSSHead' in open(p).read()
    )
    assert users == ['atss_r50-caffe_fpn_dyhead-6b_official_1x_coco.py']
