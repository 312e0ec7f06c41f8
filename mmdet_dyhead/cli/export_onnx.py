"""Export an mmdet detector with DyHead to ONNX (no custom operators).

    python tools/export_onnx.py CONFIG CHECKPOINT --out model.onnx \
        [--postprocess] [--image demo.jpg] [--static] [--opset 19] \
        [--dcn-export {deform_conv,grid_sample}] [--cfg-options k=v ...]

The graph maps a preprocessed image batch (N, 3, H, W) to the dense head's
raw outputs; decoding and NMS stay in Python (see docs/deploy.md). With
``--postprocess`` it ends in final detections instead (priors, decoding,
score threshold, top-k and NMS in the graph, the test_cfg and the
preprocessing recorded in its metadata), which the ``dyhead-run-onnx``
command (``python -m mmdet_dyhead_runtime``) runs without torch. Each
DyHead DCN is one standard ``DeformConv`` node (default, opset >= 19,
onnxruntime >= 1.25, OpenVINO through its ``DeformableConvolution``) or,
with ``--dcn-export grid_sample``, a GridSample decomposition that
runtimes without DeformConv run (older onnxruntime). With
``--image`` the export is verified: onnxruntime and PyTorch run on the same
image and must give the same detections (scores within --score-tol, boxes
within --box-tol pixels, same count). Exit status 1 if they do not.
Faster and Cascade R-CNN (their DyHead forms included) export with
``--postprocess`` only: RPN proposals, RoIAlign, the box head(s) and NMS in
one graph of standard ops. Mask R-CNN, and two-stage detectors without
``--postprocess``, are refused with exit status 2.
"""

import argparse
import os
import os.path as osp
import sys

import torch


def parse_args(argv=None):
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', required=True, help='output .onnx file')
    parser.add_argument(
        '--image',
        nargs='+',
        default=None,
        help='image(s) to trace with and to verify on',
    )
    parser.add_argument(
        '--shape',
        nargs=2,
        type=int,
        default=[800, 1344],
        metavar=('H', 'W'),
        help='input size to trace with when no --image is given',
    )
    parser.add_argument(
        '--static',
        action='store_true',
        help='fix batch and image size to the traced input',
    )
    parser.add_argument(
        '--opset',
        type=int,
        default=19,
        help='ONNX opset, 16..20 (default 19: the first with DeformConv, '
        'which the default --dcn-export needs; 16 is enough for '
        '--dcn-export grid_sample)',
    )
    parser.add_argument(
        '--dcn-export',
        choices=('deform_conv', 'grid_sample'),
        default=None,
        help='how each deformable conv is written: deform_conv = one '
        'standard DeformConv node (opset >= 19; onnxruntime >= 1.25), '
        'grid_sample = GridSample + MatMul decomposition for runtimes '
        'without DeformConv (OpenVINO, older onnxruntime). Default: '
        'deform_conv at opset >= 19, grid_sample below',
    )
    parser.add_argument(
        '--postprocess',
        action='store_true',
        help='end-to-end graph: inputs input (N, 3, H, W) and img_shape '
        '(N, 2), outputs dets (N, max_per_img, 5) and labels '
        "(N, max_per_img) with the config's test_cfg baked in; run it "
        'with dyhead-run-onnx or python -m mmdet_dyhead_runtime (no torch '
        'needed)',
    )
    parser.add_argument(
        '--box-tol',
        type=float,
        default=0.5,
        help='allowed box difference in pixels when verifying',
    )
    parser.add_argument(
        '--score-tol',
        type=float,
        default=1e-4,
        help='allowed score difference when verifying',
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, e.g. model.neck.1.dcn_backend=torch',
    )
    parser.add_argument(
        '--allow-partial-checkpoint',
        action='store_true',
        help='export with a checkpoint that leaves model weights unloaded '
        '(they keep their initial values); refused by default',
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmdet.apis import init_detector
    from mmengine.config import Config

    import mmdet_dyhead  # noqa: F401  (registers DyHeadNeck)
    from mmdet_dyhead.checkpoint import CheckpointError, load_checkpoint
    from mmdet_dyhead.deploy import (
        NativeBackendError,
        PostprocessError,
        export_onnx,
        graph_op_counts,
        img_shapes,
        load_images,
        resolve_dcn_export,
        use_native_dcn,
        verify_onnx,
    )

    try:
        # Before building the model: a wrong opset/form pair fails at once.
        dcn_form = resolve_dcn_export(args.dcn_export, args.opset)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    try:
        use_native_dcn(cfg.model)
        model = init_detector(cfg, device='cpu')
    except NativeBackendError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    refusal = _unsupported_detector(model, args.postprocess)
    if refusal:
        print(f'error: {refusal}', file=sys.stderr)
        return 2
    try:
        load_checkpoint(
            model, args.checkpoint, allow_partial=args.allow_partial_checkpoint
        )
    except CheckpointError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    if args.image:
        images, samples = load_images(model, args.image)
    else:
        h, w = args.shape
        images, samples = torch.zeros(1, 3, h, w), None
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    try:
        names = export_onnx(
            model,
            images,
            args.out,
            opset=args.opset,
            dynamic=not args.static,
            dcn_export=dcn_form,
            postprocess=args.postprocess,
            img_shape=img_shapes(samples) if samples else None,
        )
    except (NativeBackendError, PostprocessError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    import onnx

    onnx.checker.check_model(args.out)
    static_note = (
        ' (static shape ' + str(tuple(images.shape)) + ')'
        if args.static
        else ''
    )
    if args.postprocess:
        head = getattr(model, 'bbox_head', None) or model.roi_head
        k = head.test_cfg['max_per_img']
        print(
            f'wrote {args.out}: input (N, 3, H, W), img_shape (N, 2) -> '
            f'dets (N, {k}, 5), labels (N, {k}){static_note}'
        )
    else:
        print(
            f'wrote {args.out}: input (N, 3, H, W) -> {len(names)} outputs '
            f'{names[0]} .. {names[-1]}'
            f'{static_note}'
        )
    ops = graph_op_counts(args.out)
    dcn_op = 'DeformConv' if dcn_form == 'deform_conv' else 'GridSample'
    print(
        f'opset {args.opset}, --dcn-export {dcn_form}: {ops["total"]} nodes, '
        f'{ops.get(dcn_op, 0)} {dcn_op}'
    )
    if samples is None:
        print('no --image given: export not verified against onnxruntime.')
        return 0
    if args.postprocess:
        return _verify_end_to_end(args, model, images, samples)
    try:
        report = verify_onnx(
            model,
            args.out,
            images,
            samples,
            box_tol=args.box_tol,
            score_tol=args.score_tol,
        )
    except RuntimeError as e:  # no DeformConv kernel in this onnxruntime
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(
        f'raw outputs: max abs diff {report["max_raw_abs_diff"]:.3g}, '
        f'max rel diff {report["max_raw_rel_diff"]:.3g}'
    )
    for path, r in zip(args.image, report['images']):
        print(
            f'{path}: {r["count_ref"]} detections (PyTorch) vs '
            f'{r["count_other"]} (onnxruntime), max box diff '
            f'{r["max_box_diff"]:.3g} px, max score diff '
            f'{r["max_score_diff"]:.3g}: {"OK" if r["ok"] else "MISMATCH"}'
        )
    return 0 if report['ok'] else 1


def _unsupported_detector(model, postprocess: bool) -> str:
    """Why ``model`` cannot be exported, or '' if it can.

    The raw-map graph is the dense part of a one-stage detector (backbone,
    necks, dense head). A two-stage detector's RoI head pools features of
    boxes chosen at run time, so it exports end to end only
    (``--postprocess``); which RoI heads the graph covers is checked when
    it is built (mmdet_dyhead.deploy.two_stage_settings).
    """
    from mmdet.models.detectors import SingleStageDetector, TwoStageDetector

    if isinstance(model, SingleStageDetector):
        return ''
    if isinstance(model, TwoStageDetector):
        if postprocess:
            # Before loading the checkpoint: Mask R-CNN is refused at
            # once.
            from mmdet_dyhead.deploy import PostprocessError
            from mmdet_dyhead.deploy.two_stage import two_stage_settings

            try:
                two_stage_settings(model)
            except PostprocessError as e:
                return str(e)
            return ''
        return (
            f'{type(model).__name__} is a two-stage detector: its RoI head '
            f'pools boxes chosen at run time, so it has no raw-map graph. '
            f'Export it end to end with --postprocess (Faster or Cascade '
            f'R-CNN), or '
            f"run it in PyTorch: tools/image_demo.py or mmdet's "
            f'DetInferencer (docs/inference.md).'
        )
    return (
        f'{type(model).__name__} is not a one-stage or two-stage detector: '
        f'the ONNX export covers dense-head detectors (ATSS, FCOS, '
        f'RetinaNet, RTMDet) and, with --postprocess, Faster and Cascade '
        f'R-CNN. Run it '
        f"in PyTorch instead: tools/image_demo.py or mmdet's DetInferencer "
        f'(docs/inference.md), tools/test.py for COCO AP.'
    )


def _verify_end_to_end(args, model, images, samples) -> int:
    """``--postprocess --image``: onnxruntime against mmdet's predict."""
    from mmdet_dyhead.deploy import verify_end_to_end

    try:
        report = verify_end_to_end(
            model,
            args.out,
            images,
            samples,
            box_tol=args.box_tol,
            score_tol=args.score_tol,
        )
    except RuntimeError as e:  # no DeformConv kernel in this onnxruntime
        print(f'error: {e}', file=sys.stderr)
        return 1
    for path, r in zip(args.image, report['images']):
        print(
            f'{path}: {r["count_ref"]} detections (PyTorch predict) vs '
            f'{r["count_other"]} (onnxruntime, end to end), max box diff '
            f'{r["max_box_diff"]:.3g} px, max score diff '
            f'{r["max_score_diff"]:.3g}: {"OK" if r["ok"] else "MISMATCH"}'
        )
    return 0 if report['ok'] else 1


if __name__ == '__main__':
    sys.exit(main())
