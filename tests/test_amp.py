"""Mixed-precision training of ATSS + DyHead.

On CPU through the package's ``CPUAmpOptimWrapper`` (bfloat16, and float16
with loss scaling); on CUDA through mmengine's ``AmpOptimWrapper`` in
float16. Both DCN backends are covered: the native one runs inside autocast,
mmcv's kernel is run in float32 by the dispatcher (its CPU kernel has no
half types).
"""

import pytest
import torch

from mmdet_dyhead.ops import mmcv_ops_available

BACKENDS = [
    'torch',
    pytest.param(
        'mmcv',
        marks=pytest.mark.skipif(
            not mmcv_ops_available(), reason='mmcv built without ops'
        ),
    ),
]


def tiny_detector(backend):
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    init_default_scope('mmdet')
    cfg = dict(
        type='ATSS',
        data_preprocessor=dict(
            type='DetDataPreprocessor',
            mean=[123.675, 116.28, 103.53],
            std=[58.395, 57.12, 57.375],
            bgr_to_rgb=True,
            pad_size_divisor=32,
        ),
        backbone=dict(
            type='ResNet',
            depth=18,
            base_channels=8,
            out_indices=(1, 2, 3),
            frozen_stages=-1,
            norm_eval=False,
            init_cfg=None,
        ),
        neck=[
            dict(
                type='FPN',
                in_channels=[16, 32, 64],
                out_channels=32,
                start_level=0,
                add_extra_convs='on_output',
                num_outs=5,
            ),
            dict(
                type='DyHeadNeck',
                in_channels=32,
                out_channels=32,
                num_blocks=2,
                num_levels=5,
                dcn_backend=backend,
                zero_init_offset=False,
                norm_cfg=dict(type='GN', num_groups=8, requires_grad=True),
            ),
        ],
        bbox_head=dict(
            type='ATSSHead',
            num_classes=3,
            in_channels=32,
            stacked_convs=0,
            feat_channels=32,
            anchor_generator=dict(
                type='AnchorGenerator',
                ratios=[1.0],
                octave_base_scale=8,
                scales_per_octave=1,
                strides=[8, 16, 32, 64, 128],
            ),
            bbox_coder=dict(
                type='DeltaXYWHBBoxCoder',
                target_means=[0.0, 0.0, 0.0, 0.0],
                target_stds=[0.1, 0.1, 0.2, 0.2],
            ),
            loss_cls=dict(
                type='FocalLoss',
                use_sigmoid=True,
                gamma=2.0,
                alpha=0.25,
                loss_weight=1.0,
            ),
            loss_bbox=dict(type='GIoULoss', loss_weight=2.0),
            loss_centerness=dict(
                type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0
            ),
        ),
        train_cfg=dict(
            assigner=dict(type='ATSSAssigner', topk=9),
            allowed_border=-1,
            pos_weight=-1,
            debug=False,
        ),
        test_cfg=dict(
            nms_pre=1000,
            min_bbox_size=0,
            score_thr=0.05,
            nms=dict(type='nms', iou_threshold=0.6),
            max_per_img=100,
        ),
    )
    model = MODELS.build(cfg)
    with torch.no_grad():
        # Offsets of a pixel or two (not mmdet's ~0), so the DCN really
        # samples off-grid. Much larger ones would measure the conditioning
        # of bilinear sampling at random far-away points, not precision.
        for name, p in model.named_parameters():
            if 'offset_conv' in name:
                p.normal_(0, 0.02)
    return model


def batch():
    from mmdet.testing import demo_mm_inputs

    return demo_mm_inputs(
        2, [(3, 64, 96), (3, 64, 96)], num_items=[3, 2], num_classes=3
    )


def amp_wrapper(model, device, dtype):
    # Built by name, as the package's `tools/train.py --amp` chooses it.
    from mmdet.registry import OPTIM_WRAPPERS

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    name = 'AmpOptimWrapper' if device == 'cuda' else 'CPUAmpOptimWrapper'
    return OPTIM_WRAPPERS.build(
        dict(type=name, optimizer=optimizer, dtype=str(dtype).split('.')[-1])
    )


def l2_rel(a, ref):
    """||a - ref|| / ||ref||: the relative error of a whole tensor."""
    return ((a.float() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def run_amp_training(backend, device, dtype, steps=2):
    model = tiny_detector(backend).to(device)
    data = batch()
    wrapper = amp_wrapper(model, device, dtype)
    res = dict(model=model, wrapper=wrapper)

    # Inference outputs (eval mode), float32 vs the wrapper's autocast.
    model.eval()
    inputs = model.data_preprocessor(data, False)['inputs']
    seen = []
    hook = (
        model.neck[1]
        .dyhead_blocks[0]
        .spatial_attn.offset_conv.register_forward_hook(
            lambda m, i, o: seen.append(o.dtype)
        )
    )
    with torch.no_grad():
        res['ref_outs'] = model._forward(inputs)
        with wrapper.optim_context(model):
            res['amp_outs'] = model._forward(inputs)
    hook.remove()
    # Autocast must really reach the DyHead convs, else the comparison
    # below would pass trivially.
    assert seen == [torch.float32] * 5 + [dtype] * 5

    # Losses (train mode), float32 vs autocast, same weights and batch.
    model.train()
    processed = model.data_preprocessor(data, True)
    with torch.no_grad():
        res['ref_losses'] = model.loss(**_loss_args(processed))
        with wrapper.optim_context(model):
            res['amp_losses'] = model.loss(**_loss_args(processed))

    # mmengine's train_step: autocast forward, (scaled) backward, step.
    res['before'] = [p.detach().clone() for p in model.parameters()]
    res['losses'] = [model.train_step(data, wrapper) for _ in range(steps)]
    return res


def _loss_args(processed):
    return dict(
        batch_inputs=processed['inputs'],
        batch_data_samples=processed['data_samples'],
    )


def check_amp_run(res, out_tol, loss_tol):
    for group_ref, group_amp in zip(res['ref_outs'], res['amp_outs']):
        for r, a in zip(group_ref, group_amp):
            assert torch.isfinite(a).all()
            assert l2_rel(a, r) < out_tol
    for key in ('loss_cls', 'loss_bbox', 'loss_centerness'):
        ref = sum(res['ref_losses'][key]).float()
        amp = sum(res['amp_losses'][key]).float()
        assert torch.isfinite(amp)
        assert abs(amp - ref) / ref.abs() < loss_tol, (key, amp, ref)
    for step in res['losses']:
        assert all(torch.isfinite(v).all() for v in step.values()), step
    params = list(res['model'].parameters())
    assert all(torch.isfinite(p).all() for p in params)
    moved = [not torch.equal(p, b) for p, b in zip(params, res['before'])]
    # Every DyHead parameter receives gradient and is updated.
    neck_params = {id(p) for p in res['model'].neck[1].parameters()}
    assert all(m for p, m in zip(params, moved) if id(p) in neck_params)


@pytest.mark.parametrize('backend', BACKENDS)
def test_bf16_amp_training_on_cpu(backend):
    res = run_amp_training(backend, 'cpu', torch.bfloat16)
    # bfloat16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); through
    # ~30 layers of a randomly initialised network the outputs drift by a
    # few times that (measured: 1.7-2.1% here, 1.2% without DyHead). The
    # losses average over anchors and land much closer (measured < 0.1%).
    check_amp_run(res, out_tol=5e-2, loss_tol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('backend', BACKENDS)
def test_fp16_amp_training_on_cuda(backend):
    res = run_amp_training(backend, 'cuda', torch.float16)
    # float16 has 11 mantissa bits: 8x finer than bfloat16.
    check_amp_run(res, out_tol=1e-2, loss_tol=2e-3)


@pytest.mark.parametrize('backend', BACKENDS)
def test_fp16_amp_training_on_cpu(backend):
    res = run_amp_training(backend, 'cpu', torch.float16)
    assert res['wrapper'].loss_scaler.is_enabled()  # dynamic by default
    check_amp_run(res, out_tol=1e-2, loss_tol=2e-3)


def test_cpu_amp_wrapper_names_the_dtypes_it_runs():
    from mmdet_dyhead.engine import CPUAmpOptimWrapper

    optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"\['bfloat16', 'float16'\]"):
        CPUAmpOptimWrapper(optimizer=optimizer, dtype='float64')
    with pytest.raises(ValueError, match='needs GPUs'):
        CPUAmpOptimWrapper(optimizer=optimizer, use_fsdp=True)


@pytest.mark.slow
def test_train_tool_with_amp_flag_trains_dyhead(tmp_path):
    """The package's `tools/train.py CONFIG --amp` (mmdet's script inside):
    CPUAmpOptimWrapper without an accelerator, mmengine's wrapper with one."""
    import re
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT, subprocess_env, write_train_config

    config = write_train_config(tmp_path, num_train=4)
    proc = subprocess.run(
        [
            sys.executable,
            f'{REPO_ROOT}/tools/train.py',
            str(config),
            '--amp',
            '--work-dir',
            str(tmp_path / 'work'),
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    wrapper = (
        'AmpOptimWrapper'
        if torch.cuda.is_available()
        else 'CPUAmpOptimWrapper'
    )
    assert f"type='{wrapper}'" in log
    losses = [
        float(v)
        for v in re.findall(
            r'Iter\(train\) \[\d/3\].*? loss: ([-\d.eE+naif]+)', log
        )
    ]
    assert len(losses) == 3, log[-3000:]
    assert all(torch.isfinite(torch.tensor(losses))), losses
