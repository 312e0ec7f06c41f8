"""Whole-detector CPU latency: ATSS, RetinaNet and FCOS (R-50), each with and
without DyHead, in PyTorch and onnxruntime; on request (``--families``) also
Mask R-CNN, Cascade R-CNN (R-50, DyHead as a neck and in the Fig. 2c form)
and RTMDet-tiny (+ 2 DyHead blocks), in PyTorch.

Every detector is built from this package's Table 3 configs with random
weights (backbone ``init_cfg=None``; latency does not depend on the values)
and ``score_thr=0``, so every level's ``nms_pre`` best candidates reach NMS:
the most post-processing a trained model can ask for. One image of the
synthetic data at ``--size`` (default 800x1333) runs through:

- ``net``: backbone + neck + head on the preprocessed tensor (two-stage
  detectors: RPN, proposal NMS and the RoI heads included, i.e. mmdet's
  ``_forward``);
- ``predict``: the whole path from the image file: the config's test
  pipeline (load, resize, pack), the data preprocessor (normalise, pad),
  the network, box decoding and NMS (``bbox_head.predict_by_feat``);
- the same two with the network in onnxruntime (``--onnx``; exported by
  :func:`mmdet_dyhead.deploy.export_onnx` with its default DCN form;
  one-stage detectors only, the export does not cover RoI heads);
- ``bf16``: the network under CPU bfloat16 autocast, with its output
  difference to float32 (``--bf16``).

Timings are medians over ``--repeats``, the models alternating inside each
repeat (round robin), so load changes hit every model alike; ratios are
taken within one run. Example::

    python benchmarks/benchmark_detectors.py --threads 2 1 --onnx --bf16 \\
        --out work_dirs/benchmark_detectors/table.md
"""

import argparse
import os
import os.path as osp
import shlex
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

# Run from a checkout: the repository root holds mmdet_dyhead, benchmarks/
# and projects/ (none of them is installed).
ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.benchmark_dyhead import (  # noqa: E402
    load_average,
    machine_info,
    round_robin,
)


def config_path(rel_path: str) -> str:
    """``configs/<rel_path>`` of this checkout."""
    return osp.join(ROOT, 'configs', rel_path)


# (family, baseline config, +DyHead config, more +DyHead variants as
# (label, config) pairs).
FAMILIES = (
    (
        'ATSS',
        'atss/atss_r50_fpn_1x_coco.py',
        'atss/atss_r50_fpn_dyhead-6b_1x_coco.py',
    ),
    (
        'RetinaNet',
        'retinanet/retinanet_r50_fpn_1x_coco.py',
        'retinanet/retinanet_r50_fpn_dyhead-6b_1x_coco.py',
    ),
    (
        'FCOS',
        'fcos/fcos_r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_'
        '1x_coco.py',
        'fcos/fcos_r50-caffe_fpn_dyhead-6b-center-normbbox-centeronreg-giou_'
        '1x_coco.py',
    ),
    (
        'Mask R-CNN',
        'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
        'mask_rcnn/mask-rcnn_r50_fpn_dyhead-6b_1x_coco.py',
        (
            (
                'Fig. 2c',
                'mask_rcnn/mask-rcnn_r50_fpn_dyhead-6b-scale-spatial_'
                'task-attn-roi-head_1x_coco.py',
            ),
        ),
    ),
    (
        'Cascade R-CNN',
        'cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py',
        'cascade_rcnn/cascade-rcnn_r50_fpn_dyhead-6b_1x_coco.py',
        (
            (
                'Fig. 2c',
                'cascade_rcnn/cascade-rcnn_r50_fpn_dyhead-6b-scale-spatial_'
                'task-attn-roi-head_1x_coco.py',
            ),
        ),
    ),
    (
        'RTMDet-tiny',
        'rtmdet/rtmdet_tiny_8xb32-300e_coco.py',
        'rtmdet/rtmdet_tiny_dyhead-2b_8xb32-300e_coco.py',
    ),
)
# The Table 3 families run unless --families names others.
DEFAULT_FAMILIES = ('ATSS', 'RetinaNet', 'FCOS')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Whole-detector CPU latency, with and without DyHead.'
    )
    parser.add_argument(
        '--threads',
        type=int,
        nargs='+',
        default=[2, 1],
        help='torch / onnxruntime intra-op threads, one table each. '
        'Default: %(default)s.',
    )
    parser.add_argument(
        '--size',
        type=int,
        nargs=2,
        default=[800, 1333],
        metavar=('H', 'W'),
        help="Size of the test image before the config's resize. "
        'Default: %(default)s.',
    )
    parser.add_argument(
        '--families',
        nargs='+',
        default=list(DEFAULT_FAMILIES),
        choices=[f[0] for f in FAMILIES],
        help='Detector families. Default: %(default)s.',
    )
    parser.add_argument(
        '--warmup', type=int, default=1, help='Untimed runs per model.'
    )
    parser.add_argument(
        '--repeats',
        type=int,
        default=3,
        help='Timed runs per model (median). Default: %(default)s.',
    )
    parser.add_argument(
        '--onnx',
        action='store_true',
        help='Also export each detector and time it in onnxruntime.',
    )
    parser.add_argument(
        '--bf16',
        action='store_true',
        help='Also time the network under CPU bfloat16 autocast.',
    )
    parser.add_argument(
        '--work-dir',
        default='work_dirs/benchmark_detectors',
        help='Image, ONNX files and the table go here. Default: %(default)s.',
    )
    parser.add_argument(
        '--out',
        default=None,
        help='Markdown file for the tables. Default: WORK_DIR/table.md.',
    )
    return parser.parse_args(argv)


def build(rel_path: str):
    """A detector of a shipped config, random weights, every box to NMS."""
    from mmdet.apis import init_detector
    from mmengine.config import Config

    from mmdet_dyhead.deploy import use_native_dcn

    cfg = Config.fromfile(config_path(rel_path))
    cfg.model.backbone.init_cfg = None
    test_cfg = cfg.model.test_cfg
    # Two-stage detectors: the final (RoI head) threshold.
    (test_cfg.rcnn if 'rcnn' in test_cfg else test_cfg).score_thr = 0.0
    # The native DCN is what runs on CPU ('auto') and what exports.
    use_native_dcn(cfg.model)
    return init_detector(cfg, device='cpu')


def rel_l2(outs, refs) -> float:
    """max over outputs of ||a - b|| / ||b||."""
    worst = 0.0
    for a, b in zip(outs, refs):
        a, b = a.float(), b.float()
        worst = max(worst, ((a - b).norm() / b.norm().clamp_min(1e-12)).item())
    return worst


def flat(groups) -> List[torch.Tensor]:
    return [t for group in groups for t in group]


def prepare(args, families) -> Dict[str, dict]:
    """Models, inputs and (optionally) ONNX sessions, built once."""
    from projects.synthetic_coco import generate_synthetic_coco

    data = generate_synthetic_coco(
        osp.join(args.work_dir, 'image'),
        num_train=1,
        num_val=1,
        image_size=list(args.size),
        reuse=True,
    )
    val_dir = osp.join(data['data_root'], data['val_img_dir'])
    image = osp.join(val_dir, sorted(os.listdir(val_dir))[0])
    entries = {}
    for family, base, dyhead, *more in families:
        variants = [(family, base), (f'{family} + DyHead', dyhead)]
        for label, rel in more[0] if more else ():
            variants.append((f'{family} + DyHead ({label})', rel))
        for name, rel in variants:
            model = build(rel)
            entries[name] = dict(model=model, image=image, base=family)
    return entries


def one_stage(model) -> bool:
    from mmdet.models.detectors import SingleStageDetector

    return isinstance(model, SingleStageDetector)


def add_onnx(args, entries: Dict[str, dict]) -> None:
    from mmdet_dyhead.deploy import export_onnx, load_images

    for name, e in entries.items():
        if not one_stage(e['model']):
            continue  # the export covers dense heads only
        images, _ = load_images(e['model'], [e['image']])
        path = osp.join(
            args.work_dir, name.lower().replace(' + ', '_') + '.onnx'
        )
        t0 = time.perf_counter()
        export_onnx(e['model'], images, path)
        e['onnx'] = path
        e['export_s'] = time.perf_counter() - t0


def sessions(entries: Dict[str, dict], threads: int) -> None:
    import onnxruntime as ort

    for e in entries.values():
        if 'onnx' in e:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            e['session'] = ort.InferenceSession(
                e['onnx'], opts, providers=['CPUExecutionProvider']
            )


def timed_calls(args, entries) -> Dict[str, Dict[str, Callable[[], None]]]:
    """Per measurement kind: {model name: call}."""
    from mmdet_dyhead.deploy import (
        DetectorTensorForward,
        decode_raw_outputs,
        load_images,
    )

    calls = {'net': {}, 'predict': {}}
    if args.onnx:
        calls['ort net'] = {}
        calls['ort predict'] = {}
    if args.bf16:
        calls['bf16 net'] = {}
    for name, e in entries.items():
        model, image = e['model'], e['image']
        images, samples = load_images(model, [image])

        def net(model=model, images=images, samples=samples):
            # Two-stage detectors read the image metas in the RPN step.
            with torch.no_grad():
                model._forward(images, samples)

        def predict(model=model, image=image):
            with torch.no_grad():
                inputs, samples = load_images(model, [image])
                model.predict(inputs, samples)

        calls['net'][name] = net
        calls['predict'][name] = predict
        if 'session' in e:
            wrapper = DetectorTensorForward(model).eval()
            with torch.no_grad():
                wrapper(images)
            feed = {'input': images.numpy()}

            def ort_net(sess=e['session'], feed=feed):
                sess.run(None, feed)

            def ort_predict(
                sess=e['session'], model=model, image=image, wrapper=wrapper
            ):
                inputs, samples = load_images(model, [image])
                outs = sess.run(None, {'input': inputs.numpy()})
                with torch.no_grad():
                    decode_raw_outputs(
                        model,
                        wrapper.unflatten([torch.from_numpy(o) for o in outs]),
                        samples,
                    )

            calls['ort net'][name] = ort_net
            calls['ort predict'][name] = ort_predict
        if args.bf16:

            def bf16_net(model=model, images=images, samples=samples):
                with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
                    model._forward(images, samples)

            calls['bf16 net'][name] = bf16_net
    return calls


def accuracy(entries) -> Dict[str, Dict[str, float]]:
    """Output differences of onnxruntime and bf16 against float32 PyTorch."""
    from mmdet_dyhead.deploy import load_images

    out = {}
    for name, e in entries.items():
        images, samples = load_images(e['model'], [e['image']])
        row = {}
        out[name] = row
        if not one_stage(e['model']):
            # The RoI heads' outputs depend on the proposals kept, which
            # bf16 changes: no element-wise comparison.
            row['bf16'] = float('nan')
            continue
        with torch.no_grad():
            ref = flat(e['model']._forward(images))
            if 'session' in e:
                outs = e['session'].run(None, {'input': images.numpy()})
                row['ort'] = rel_l2([torch.from_numpy(o) for o in outs], ref)
            with torch.autocast('cpu', torch.bfloat16):
                row['bf16'] = rel_l2(flat(e['model']._forward(images)), ref)
    return out


def table(args, threads: int, entries, times, errors) -> List[str]:
    kinds = list(times)
    lines = [
        f'### {threads} thread{"s" if threads > 1 else ""} '
        f'(load average at start of table: {load_average()})',
        '',
        '| detector | '
        + ' | '.join(f'{k} (s)' for k in kinds)
        + ' | net vs baseline | predict vs baseline |'
        + (' ort net / torch net |' if 'ort net' in kinds else '')
        + (
            ' bf16 net / fp32 net | bf16 rel. L2 err |'
            if 'bf16 net' in kinds
            else ''
        ),
        '|---'
        * (len(kinds) + 3 + ('ort net' in kinds) + 2 * ('bf16 net' in kinds))
        + '|',
    ]
    for name, e in entries.items():
        base = e['base']
        cells = [
            f'{times[k][name]:.3f}' if name in times[k] else '-' for k in kinds
        ]
        cells.append(f'{times["net"][name] / times["net"][base]:.2f}x')
        cells.append(f'{times["predict"][name] / times["predict"][base]:.2f}x')
        if 'ort net' in kinds:
            cells.append(
                f'{times["ort net"][name] / times["net"][name]:.2f}x'
                if name in times['ort net']
                else '-'
            )
        if 'bf16 net' in kinds:
            cells.append(
                f'{times["bf16 net"][name] / times["net"][name]:.2f}x'
            )
            cells.append(f'{errors[name]["bf16"]:.1e}')
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return lines


def main(argv: Optional[List[str]] = None) -> str:
    args = parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    out = args.out or osp.join(args.work_dir, 'table.md')
    families = [f for f in FAMILIES if f[0] in args.families]
    entries = prepare(args, families)
    if args.onnx:
        add_onnx(args, entries)
    lines = [
        '## Whole-detector latency (CPU)',
        '',
        f'- Command: `python benchmarks/benchmark_detectors.py '
        f'{shlex.join(argv if argv is not None else sys.argv[1:])}`',
        f'- Machine: {machine_info(torch.device("cpu"))}',
        f"- Image {args.size[0]}x{args.size[1]} before the configs' resize "
        f'(1333x800 keep-ratio; RTMDet: 640x640 keep-ratio, padded to '
        f'640x640), batch 1, random weights, score_thr=0; '
        f'median of {args.repeats} runs after {args.warmup} warm-up, '
        f'models alternating.',
        '',
    ]
    errors = None
    for threads in args.threads:
        torch.set_num_threads(threads)
        if args.onnx:
            sessions(entries, threads)
        if errors is None:
            errors = accuracy(entries)
        calls = timed_calls(args, entries)
        times = {
            kind: round_robin(
                fns, args.warmup, args.repeats, torch.device('cpu')
            )
            for kind, fns in calls.items()
        }
        lines += table(args, threads, entries, times, errors) + ['']
        print('\n'.join(lines[-len(entries) - 5 :]), flush=True)
    if args.onnx:
        lines.append(
            'onnxruntime vs PyTorch float32 outputs, max rel. L2 error: '
            + ', '.join(
                f'{n} {e["ort"]:.1e}' for n, e in errors.items() if 'ort' in e
            )
            + '.'
        )
    text = '\n'.join(lines) + '\n'
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    with open(out, 'w') as f:
        f.write(text)
    print(f'wrote {out}')
    return text


if __name__ == '__main__':
    main()
