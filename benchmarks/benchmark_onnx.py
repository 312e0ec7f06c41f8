"""Time an exported DyHead detector in onnxruntime in both DCN forms.

For each model the detector (random weights, non-zero DCN offsets) is
exported twice with :func:`mmdet_dyhead.deploy.export_onnx` at opset 19,
with dynamic axes as ``tools/export_onnx.py`` writes it: once with one
standard ``DeformConv`` node per DCN (the default) and once with the
``GridSample`` decomposition (``--dcn-export grid_sample``). Both files and
the PyTorch native path (``dcn_backend='torch'``, the gather kernel) then
run on the same input at each thread count, round-robin within each repeat
so machine load hits all alike. With OpenVINO installed (``pip install
openvino``), the ``grid_sample`` file also runs in OpenVINO's CPU plugin
(the form it can convert; compiled for the input's static shape, as the
runner does). The table gives medians after
warm-up, ratios from the same run, the node counts and the largest output
difference to PyTorch.

Models:

- ``tiny``: the test suite's detector, ResNet-18 at 1/8 width, 32-channel
  FPN and 2 DyHead blocks;
- ``atss_r50_6b``: ``configs/atss/atss_r50_fpn_dyhead-6b_1x_coco.py`` as
  configured (ResNet-50, 256-channel FPN, 6 DyHead blocks).

Examples::

    python benchmarks/benchmark_onnx.py  # tiny 512x672, ATSS-R50 800x1344
    python benchmarks/benchmark_onnx.py --models tiny --sizes 320x480
    python benchmarks/benchmark_onnx.py --threads 1 2 4 --repeats 5
"""

import argparse
import os
import os.path as osp
import shlex
import sys
import time
import warnings
from typing import Dict, List, Sequence

import numpy as np
import torch

# Run from a checkout: the repository root holds mmdet_dyhead, benchmarks/
# and projects/ (none of them is installed).
ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.benchmark_dyhead import (  # noqa: E402
    load_average,
    machine_info,
    parse_size,
    round_robin,
)


def config_path(*parts: str) -> str:
    """``configs/<parts>`` of this checkout."""
    return osp.join(ROOT, 'configs', *parts)


MODELS = ('tiny', 'atss_r50_6b')
DEFAULT_SIZES = {'tiny': (512, 672), 'atss_r50_6b': (800, 1344)}
FORMS = ('deform_conv', 'grid_sample')


def model_config(name: str):
    """The mmengine config of a benchmark model (random weights)."""
    from mmengine.config import Config

    cfg = Config.fromfile(
        config_path('atss', 'atss_r50_fpn_dyhead-6b_1x_coco.py')
    )
    # Random weights: no pretrained backbone download.
    cfg.model.backbone.init_cfg = None
    # Offsets that deform (mmdet initialises the offset conv to zero).
    cfg.model.neck[1].zero_init_offset = False
    if name == 'tiny':
        cfg.merge_from_dict(
            dict(
                model=dict(
                    backbone=dict(
                        depth=18,
                        base_channels=8,
                        out_indices=(1, 2, 3),
                        frozen_stages=-1,
                        norm_eval=False,
                    ),
                    bbox_head=dict(
                        num_classes=3, in_channels=32, feat_channels=32
                    ),
                )
            )
        )
        cfg.model.neck[0].update(
            in_channels=[16, 32, 64], out_channels=32, start_level=0
        )
        cfg.model.neck[1].update(
            in_channels=32,
            out_channels=32,
            num_blocks=2,
            norm_cfg=dict(type='GN', num_groups=8, requires_grad=True),
        )
    elif name != 'atss_r50_6b':
        raise ValueError(f'unknown model {name!r}; choose from {MODELS}.')
    return cfg


def bench_model(
    name: str,
    size: Sequence[int],
    threads: Sequence[int],
    warmup: int,
    repeats: int,
    workdir: str,
) -> List[Dict]:
    """Export ``name`` in both forms and time it at every thread count.

    Returns:
        list[dict]: One row per thread count: ``ms`` per runner
        (``torch``, ``deform_conv``, ``grid_sample`` and, with OpenVINO
        installed, ``openvino``), ``nodes`` per form and ``diff`` (max abs
        output difference to PyTorch) per ONNX runner.
    """
    from mmdet.apis import init_detector

    from mmdet_dyhead.deploy import (
        DetectorTensorForward,
        export_onnx,
        graph_op_counts,
        onnxruntime_session,
        use_native_dcn,
    )

    torch.manual_seed(0)
    cfg = model_config(name)
    use_native_dcn(cfg.model)
    model = init_detector(cfg, device='cpu')
    wrapper = DetectorTensorForward(model).eval()
    images = torch.randn(1, 3, *size)
    files, nodes = {}, {}
    for form in FORMS:
        files[form] = osp.join(workdir, f'{name}_{form}.onnx')
        t0 = time.perf_counter()
        export_onnx(model, images, files[form], opset=19, dcn_export=form)
        nodes[form] = graph_op_counts(files[form])['total']
        print(
            f'{name}: exported {form} ({nodes[form]} nodes) in '
            f'{time.perf_counter() - t0:.0f} s',
            file=sys.stderr,
        )
    feed = {'input': images.numpy()}
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        sessions = {f: onnxruntime_session(files[f], t) for f in FORMS}
        if openvino_installed():
            from mmdet_dyhead.deploy.runtime import OpenVinoSession

            sessions['openvino'] = OpenVinoSession(files['grid_sample'], t)

        def run_torch():
            with torch.no_grad():
                return wrapper(images)

        fns = {'torch': run_torch}
        for form, session in sessions.items():
            fns[form] = lambda s=session: s.run(None, feed)
        ref = [r.numpy() for r in run_torch()]
        diff = {
            f: max(
                float(np.abs(o - r).max())
                for o, r in zip(sessions[f].run(None, feed), ref)
            )
            for f in sessions
        }
        secs = round_robin(fns, warmup, repeats, torch.device('cpu'))
        rows.append(
            dict(
                model=name,
                size=tuple(size),
                threads=t,
                ms={k: v * 1000 for k, v in secs.items()},
                nodes=nodes,
                diff=diff,
            )
        )
        print(f'{name} {t} thread(s): {rows[-1]["ms"]}', file=sys.stderr)
    return rows


def openvino_installed() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def openvino_table(rows: Sequence[Dict]) -> str:
    """OpenVINO beside onnxruntime and PyTorch (rows that ran it)."""
    lines = [
        '| model | input | threads | PyTorch native | ORT DeformConv | '
        'ORT grid_sample | OpenVINO grid_sample | OpenVINO / PyTorch | '
        'OpenVINO / ORT DeformConv | max abs diff to PyTorch (OpenVINO) |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        ms = r['ms']
        if 'openvino' not in ms:
            continue
        lines.append(
            f'| {r["model"]} | {r["size"][0]}x{r["size"][1]} | '
            f'{r["threads"]} | {ms["torch"]:.0f} ms | '
            f'{ms["deform_conv"]:.0f} ms | {ms["grid_sample"]:.0f} ms | '
            f'{ms["openvino"]:.0f} ms | '
            f'{ms["openvino"] / ms["torch"]:.2f}x | '
            f'{ms["openvino"] / ms["deform_conv"]:.2f}x | '
            f'{r["diff"]["openvino"]:.1e} |'
        )
    return '\n'.join(lines)


def markdown(rows: Sequence[Dict]) -> str:
    lines = [
        '| model | input | threads | PyTorch native | ORT DeformConv | '
        'ORT grid_sample | DeformConv / grid_sample | '
        'DeformConv / PyTorch | nodes (DeformConv / grid_sample) | '
        'max abs diff to PyTorch (DeformConv / grid_sample) |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        ms, n, d = r['ms'], r['nodes'], r['diff']
        lines.append(
            f'| {r["model"]} | {r["size"][0]}x{r["size"][1]} | '
            f'{r["threads"]} | {ms["torch"]:.0f} ms | '
            f'{ms["deform_conv"]:.0f} ms | {ms["grid_sample"]:.0f} ms | '
            f'{ms["deform_conv"] / ms["grid_sample"]:.2f}x | '
            f'{ms["deform_conv"] / ms["torch"]:.2f}x | '
            f'{n["deform_conv"]} / {n["grid_sample"]} | '
            f'{d["deform_conv"]:.1e} / {d["grid_sample"]:.1e} |'
        )
    return '\n'.join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument(
        '--models',
        nargs='+',
        choices=MODELS,
        default=list(MODELS),
        help='models to time (default: all)',
    )
    p.add_argument(
        '--sizes',
        nargs='+',
        type=parse_size,
        default=None,
        metavar='HxW',
        help='input size per model, in --models order (default: tiny '
        '512x672, atss_r50_6b 800x1344)',
    )
    p.add_argument(
        '--threads',
        nargs='+',
        type=int,
        default=[1, 2],
        help='intra-op threads of torch and onnxruntime (default: 1 2)',
    )
    p.add_argument(
        '--warmup',
        type=int,
        default=1,
        help='untimed runs of each path first (default: %(default)s)',
    )
    p.add_argument(
        '--repeats',
        type=int,
        default=5,
        help='timed runs per path, median reported (default: %(default)s)',
    )
    p.add_argument(
        '--work-dir',
        default='work_dirs/benchmark_onnx',
        help='where the .onnx files and the table go (default: %(default)s)',
    )
    p.add_argument(
        '--out',
        default=None,
        help='markdown file for the table (default: WORK_DIR/table.md)',
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import mmdet_dyhead  # noqa: F401  (registers DyHeadNeck)

    sizes = args.sizes or [DEFAULT_SIZES[m] for m in args.models]
    if len(sizes) != len(args.models):
        print(
            'error: give one --sizes entry per model in --models',
            file=sys.stderr,
        )
        return 2
    load_before = load_average()
    rows = []
    os.makedirs(args.work_dir, exist_ok=True)
    with warnings.catch_warnings():
        # The exporter's deprecation notice, once per export.
        warnings.simplefilter('ignore', DeprecationWarning)
        for name, size in zip(args.models, sizes):
            rows += bench_model(
                name,
                size,
                args.threads,
                args.warmup,
                args.repeats,
                args.work_dir,
            )
    command = 'python benchmarks/benchmark_onnx.py ' + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    import onnxruntime

    versions = f'onnxruntime {onnxruntime.__version__}'
    if openvino_installed():
        import openvino

        versions += f', OpenVINO {openvino.__version__.split("-")[0]}'
    text = '\n'.join(
        [
            f'`{command.strip()}`',
            '',
            f'{machine_info(torch.device("cpu"))}, {versions}; '
            f'load average before '
            f'{load_before}, after '
            f'{load_average()}; batch 1, medians of {args.repeats} runs '
            f'after {args.warmup} warm-up, opset 19, dynamic axes.',
            '',
            markdown(rows),
        ]
    )
    if any('openvino' in r['ms'] for r in rows):
        text += '\n\n' + openvino_table(rows)
    print(text)
    out = args.out or osp.join(args.work_dir, 'table.md')
    with open(out, 'w') as f:
        f.write(text + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
