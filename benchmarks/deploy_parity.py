"""COCO AP of the end-to-end ONNX export beside the PyTorch model, and speed.

Exports a trained detector with ``tools/export_onnx.py --postprocess`` in
both DCN forms, then detects every image of its test split three ways:

- PyTorch: mmdet's test pipeline (``load_images``) and ``model.predict``,
  what ``tools/test.py`` does at batch size 1;
- onnxruntime and, if installed, OpenVINO, each on both files (OpenVINO
  runs ``DeformConv`` as its own ``DeformableConvolution``): the
  torch-free runner (``mmdet_dyhead_runtime``, ``dyhead-run-onnx``: its own
  numpy/OpenCV preprocessing, the graph, the boxes scaled back to the
  original image).

It prints (and writes to ``<out-dir>/parity.md``) the COCO AP of each
(pycocotools, the split's annotation file), how many images give the same
detections as PyTorch (same count, boxes within 0.5 px, scores within
1e-4), and the median time per image from the preprocessed batch to the
detections (PyTorch: ``predict``; runtimes: the graph run). Defaults: the
quickstart's checkpoint and its synthetic val split (100 images)::

    python scripts/quickstart.py            # trains it, if not done yet
    python benchmarks/deploy_parity.py
"""

import argparse
import contextlib
import io
import os
import os.path as osp
import platform
import statistics
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CONFIG = 'configs/quickstart/atss_r18-tiny_fpn_dyhead-2b_synthetic.py'
CHECKPOINT = 'work_dirs/quickstart/train/iter_600.pth'
FORMS = ('deform_conv', 'grid_sample')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', default=CONFIG)
    parser.add_argument('--checkpoint', default=CHECKPOINT)
    parser.add_argument(
        '--out-dir', default=osp.join('work_dirs', 'deploy_parity')
    )
    parser.add_argument(
        '--threads', type=int, default=1, help='threads of every framework'
    )
    parser.add_argument(
        '--limit', type=int, default=None, help='first N images only'
    )
    return parser.parse_args(argv)


def export(args, form: str) -> str:
    """The end-to-end file of ``form``, written by the CLI a user runs."""
    out = osp.join(args.out_dir, f'model_{form}.onnx')
    cmd = [
        sys.executable,
        osp.join(ROOT, 'tools', 'export_onnx.py'),
        args.config,
        args.checkpoint,
        '--out',
        out,
        '--postprocess',
        '--dcn-export',
        form,
    ]
    print('$', ' '.join(cmd[1:]), flush=True)
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return out


def coco_ap(coco, results) -> float:
    """AP@[.5:.95] of ``results`` (COCO json dicts) by pycocotools."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        dets = coco.loadRes(results)
        ev = COCOeval(coco, dets, 'bbox')
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def to_coco(image_id, bboxes, scores, labels, cat_ids):
    return [
        dict(
            image_id=image_id,
            category_id=cat_ids[int(lab)],
            bbox=[
                float(b[0]),
                float(b[1]),
                float(b[2] - b[0]),
                float(b[3] - b[1]),
            ],
            score=float(s),
        )
        for b, s, lab in zip(bboxes, scores, labels)
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)
    os.makedirs(args.out_dir, exist_ok=True)
    import numpy as np
    import torch
    from mmdet.apis import init_detector
    from mmengine.config import Config
    from mmengine.structures import InstanceData
    from pycocotools.coco import COCO

    import mmdet_dyhead_runtime as rt
    from mmdet_dyhead.checkpoint import load_checkpoint
    from mmdet_dyhead.deploy import (
        load_images,
        match_detections,
        use_native_dcn,
    )

    torch.set_num_threads(args.threads)
    files = {form: export(args, form) for form in FORMS}

    cfg = Config.fromfile(args.config)
    use_native_dcn(cfg.model)
    model = init_detector(cfg, device='cpu')
    load_checkpoint(model, args.checkpoint)
    model.eval()
    ds = cfg.test_dataloader.dataset
    ann = osp.join(ds.data_root, ds.ann_file)
    img_dir = osp.join(ds.data_root, ds.data_prefix['img'])
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(ann)
    classes = ds.metainfo['classes']
    cat_ids = coco.getCatIds(catNms=list(classes))
    cat_ids = [
        next(c for c in cat_ids if coco.cats[c]['name'] == n) for n in classes
    ]
    img_ids = sorted(coco.getImgIds())[: args.limit]

    runners = {}
    notes = []
    try:
        import openvino

        ov_version = openvino.__version__.split('-')[0]
    except ImportError:
        ov_version = None
        notes.append('OpenVINO: not installed (pip install openvino)')
    for form, path in files.items():
        runners[('onnxruntime', form)] = rt.OnnxDetector(
            path, args.threads, 'onnxruntime'
        )
        if ov_version:
            try:
                runners[('openvino', form)] = rt.OnnxDetector(
                    path, args.threads, 'openvino'
                )
            except RuntimeError as e:
                notes.append(f'OpenVINO, {form}: cannot run: {e}')

    results = {'pytorch': []}
    results.update({k: [] for k in runners})
    times = {k: [] for k in results}
    agree = {k: [] for k in runners}
    for n, img_id in enumerate(img_ids):
        path = osp.join(img_dir, coco.imgs[img_id]['file_name'])
        inputs, samples = load_images(model, [path])
        t = time.perf_counter()
        with torch.no_grad():
            (ref,) = model.predict(inputs, samples, rescale=True)
        times['pytorch'].append(time.perf_counter() - t)
        ref = ref.pred_instances
        results['pytorch'] += to_coco(
            img_id, ref.bboxes, ref.scores, ref.labels, cat_ids
        )
        image = rt.read_image(path)
        for key, det in runners.items():
            batch, shapes, _ = rt.preprocess([image], det.preprocess_settings)
            t = time.perf_counter()
            det.run(batch, shapes)
            times[key].append(time.perf_counter() - t)
            (out,) = det([image])
            results[key] += to_coco(
                img_id, out['bboxes'], out['scores'], out['labels'], cat_ids
            )
            other = InstanceData(
                bboxes=torch.from_numpy(out['bboxes']),
                scores=torch.from_numpy(out['scores']),
                labels=torch.from_numpy(out['labels']),
            )
            agree[key].append(match_detections(ref, other, 0.5, 1e-4))
        if n % 20 == 0:
            print(f'{n + 1}/{len(img_ids)} images', flush=True)

    def ms(values):
        # The first image pays for start-up (OpenVINO: compilation).
        return f'{statistics.median(values[1:] or values) * 1e3:.1f} ms'

    versions = [
        f'torch {torch.__version__}',
        f'onnxruntime {rt_version()}',
        f'OpenVINO {ov_version}' if ov_version else 'no OpenVINO',
        f'numpy {np.__version__}',
    ]
    lines = [
        f'{len(img_ids)} images of {ann}; {args.checkpoint}; '
        f'{args.threads} thread(s); {", ".join(versions)}; '
        f'{platform.processor() or platform.machine()}.',
        '',
        '| run | DCN form | COCO AP | AP - PyTorch AP | images equal to '
        'PyTorch | max box diff | max score diff | median time / image |',
        '|---|---|---|---|---|---|---|---|',
    ]
    base = coco_ap(coco, results['pytorch'])
    lines.append(
        f'| PyTorch `predict` | native DCN | {base:.4f} | - | - | - | - | '
        f'{ms(times["pytorch"])} |'
    )
    for key in runners:
        ap = coco_ap(coco, results[key])
        a = agree[key]
        lines.append(
            f'| {key[0]} end to end | `{key[1]}` | {ap:.4f} | '
            f'{ap - base:+.4f} | {sum(r["ok"] for r in a)}/{len(a)} | '
            f'{max(r["max_box_diff"] for r in a):.2g} px | '
            f'{max(r["max_score_diff"] for r in a):.2g} | '
            f'{ms(times[key])} |'
        )
    lines += [''] + [f'- {note}' for note in notes]
    text = '\n'.join(lines) + '\n'
    print(text)
    with open(osp.join(args.out_dir, 'parity.md'), 'w') as f:
        f.write(text)
    return 0


def rt_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == '__main__':
    sys.exit(main())
