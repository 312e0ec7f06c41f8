"""Time an exported DyHead detector in onnxruntime and OpenVINO, both DCN
forms, against PyTorch and against the plain ATSS-R50 floor.

For each DyHead model the detector (random weights, non-zero DCN offsets)
is exported twice with :func:`mmdet_dyhead.deploy.export_onnx` at opset
19, with dynamic axes as ``tools/export_onnx.py`` writes it: once with one
standard ``DeformConv`` node per DCN (the default) and once with the
``GridSample`` decomposition (``--dcn-export grid_sample``). A floor model
(the same detector without DyHead: mmdet's ATSS with its conv-tower head)
has no DCN and is exported once. Every file runs in onnxruntime and, with
OpenVINO installed (``pip install openvino``), in OpenVINO's CPU plugin
(``DeformConv`` through its own ``DeformableConvolution``, as the runner
converts it; compiled for the input's static shape, as the runner does);
PyTorch runs each model eagerly (``dcn_backend='torch'``, the gather
kernel). All runners of all models of one input size alternate inside
every repeat (round-robin), so machine load hits them alike and the
DyHead / floor ratios come from one run. The tables give medians after
warm-up, ratios, node counts and the largest output difference to PyTorch.

Models:

- ``tiny``: the test suite's detector, ResNet-18 at 1/8 width, 32-channel
  FPN and 2 DyHead blocks; ``tiny_atss``, its floor: the same backbone and
  FPN, mmdet's ATSS head with its 4-conv towers, no DyHead;
- ``atss_r50_6b``: ``configs/atss/atss_r50_fpn_dyhead-6b_1x_coco.py`` as
  configured (ResNet-50, 256-channel FPN, 6 DyHead blocks); ``atss_r50``,
  its floor: ``configs/atss/atss_r50_fpn_1x_coco.py`` (mmdet's
  ``atss_r50_fpn_1x_coco``).

Examples::

    python benchmarks/benchmark_onnx.py  # tiny pair 512x672, R50 800x1344
    python benchmarks/benchmark_onnx.py --models atss_r50_6b atss_r50
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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

# Run from a checkout: the repository root holds mmdet_dyhead, the runner
# mmdet_dyhead_runtime, benchmarks/ and projects/ (none of them installed).
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


MODELS = ('tiny', 'tiny_atss', 'atss_r50_6b', 'atss_r50')
# Each DyHead model's floor: the same detector without DyHead.
FLOORS = {'tiny': 'tiny_atss', 'atss_r50_6b': 'atss_r50'}
DEFAULT_SIZES = {
    'tiny': (512, 672),
    'tiny_atss': (512, 672),
    'atss_r50_6b': (800, 1344),
    'atss_r50': (800, 1344),
}
FORMS = ('deform_conv', 'grid_sample')
# Column titles; a runner is (runtime, DCN form), form None for PyTorch
# and for models without DCN. A PyTorch compiled runner goes into
# torch_runners() with its own runtime key and title here.
RUNTIMES = {
    'torch': 'PyTorch eager',
    'onnxruntime': 'onnxruntime',
    'openvino': 'OpenVINO',
}
FORM_TITLES = {'deform_conv': 'DeformConv', 'grid_sample': 'grid_sample'}
Runner = Tuple[str, Optional[str]]


def model_config(name: str):
    """The mmengine config of a benchmark model (random weights)."""
    from mmengine.config import Config

    if name not in MODELS:
        raise ValueError(f'unknown model {name!r}; choose from {MODELS}.')
    dyhead = name in FLOORS
    cfg = Config.fromfile(
        config_path(
            'atss',
            'atss_r50_fpn_dyhead-6b_1x_coco.py'
            if dyhead
            else 'atss_r50_fpn_1x_coco.py',
        )
    )
    # Random weights: no pretrained backbone download.
    cfg.model.backbone.init_cfg = None
    if dyhead:
        # Offsets that deform (mmdet initialises the offset conv to zero).
        cfg.model.neck[1].zero_init_offset = False
    if name.startswith('tiny'):
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
        fpn = cfg.model.neck[0] if dyhead else cfg.model.neck
        fpn.update(in_channels=[16, 32, 64], out_channels=32, start_level=0)
        if dyhead:
            cfg.model.neck[1].update(
                in_channels=32,
                out_channels=32,
                num_blocks=2,
                norm_cfg=dict(type='GN', num_groups=8, requires_grad=True),
            )
    return cfg


def openvino_installed() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def prepare(name: str, size: Sequence[int], workdir: str) -> Dict:
    """Build ``name`` and export it (both forms if it has DyHead).

    Returns:
        dict: ``name``, ``size``, ``wrapper`` (the tensor forward),
        ``images``, ``files`` and ``nodes`` per form (None: no DCN).
    """
    from mmdet.apis import init_detector

    from mmdet_dyhead.deploy import (
        DetectorTensorForward,
        export_onnx,
        graph_op_counts,
        use_native_dcn,
    )

    torch.manual_seed(0)
    cfg = model_config(name)
    use_native_dcn(cfg.model)
    model = init_detector(cfg, device='cpu')
    wrapper = DetectorTensorForward(model).eval()
    images = torch.randn(1, 3, *size)
    forms = FORMS if name in FLOORS else (None,)
    files, nodes = {}, {}
    for form in forms:
        stem = f'{name}_{form}' if form else name
        files[form] = osp.join(workdir, f'{stem}.onnx')
        t0 = time.perf_counter()
        export_onnx(
            model, images, files[form], opset=19, dcn_export=form or None
        )
        nodes[form] = graph_op_counts(files[form])['total']
        print(
            f'{name}: exported {stem}.onnx ({nodes[form]} nodes) in '
            f'{time.perf_counter() - t0:.0f} s',
            file=sys.stderr,
        )
    return dict(
        name=name,
        size=tuple(size),
        wrapper=wrapper,
        images=images,
        files=files,
        nodes=nodes,
    )


def torch_runners(entry: Dict) -> Dict[Runner, Callable]:
    """The PyTorch runners of one model (eager; add compiled here)."""
    wrapper, images = entry['wrapper'], entry['images']

    def eager():
        with torch.no_grad():
            return wrapper(images)

    return {('torch', None): eager}


def onnx_runners(
    entry: Dict, threads: int, notes: List[str]
) -> Dict[Runner, Callable]:
    """onnxruntime and (if installed) OpenVINO on each exported file."""
    from mmdet_dyhead.deploy import onnxruntime_session
    from mmdet_dyhead_runtime import OpenVinoSession

    feed = {'input': entry['images'].numpy()}
    sessions = {}
    for form, path in entry['files'].items():
        sessions[('onnxruntime', form)] = onnxruntime_session(path, threads)
    for form, path in entry['files'].items():
        if not openvino_installed():
            break
        try:
            sessions[('openvino', form)] = OpenVinoSession(path, threads)
        except RuntimeError as e:  # an OpenVINO too old for DeformConv
            notes.append(f'OpenVINO, {entry["name"]} {form}: {e}')
    return {
        key: (lambda s=session: s.run(None, feed))
        for key, session in sessions.items()
    }


def as_numpy(outputs) -> List[np.ndarray]:
    return [
        o.numpy() if isinstance(o, torch.Tensor) else np.asarray(o)
        for o in outputs
    ]


def bench(
    entries: Sequence[Dict],
    threads: Sequence[int],
    warmup: int,
    repeats: int,
    notes: List[str],
) -> List[Dict]:
    """Time every runner of every model; models of one input size share
    one round-robin.

    Returns:
        list[dict]: One row per (model, threads, runner): ``ms``,
        ``nodes`` (None for PyTorch) and ``diff`` (max abs output
        difference to PyTorch eager; None for it).
    """
    rows = []
    sizes = sorted({e['size'] for e in entries})
    for t in threads:
        torch.set_num_threads(t)
        for size in sizes:
            group = [e for e in entries if e['size'] == size]
            fns, diffs = {}, {}
            for e in group:
                runners = torch_runners(e)
                runners.update(onnx_runners(e, t, notes))
                ref = as_numpy(runners[('torch', None)]())
                for key, fn in runners.items():
                    fns[(e['name'],) + key] = fn
                    if key != ('torch', None):
                        diffs[(e['name'],) + key] = max(
                            float(np.abs(o - r).max())
                            for o, r in zip(as_numpy(fn()), ref)
                        )
            secs = round_robin(fns, warmup, repeats, torch.device('cpu'))
            for (name, runtime, form), s in secs.items():
                entry = next(e for e in group if e['name'] == name)
                rows.append(
                    dict(
                        model=name,
                        size=size,
                        threads=t,
                        runtime=runtime,
                        form=form,
                        ms=s * 1000,
                        nodes=None
                        if runtime == 'torch'
                        else entry['nodes'][form],
                        diff=diffs.get((name, runtime, form)),
                    )
                )
            print(
                f'{size[0]}x{size[1]}, {t} thread(s): '
                + ', '.join(
                    f'{r["model"]} {r["runtime"]} {r["form"]} {r["ms"]:.0f} ms'
                    for r in rows
                    if r['threads'] == t and r['size'] == size
                ),
                file=sys.stderr,
            )
    return rows


def _size(r: Dict) -> str:
    return f'{r["size"][0]}x{r["size"][1]}'


def _form(r: Dict) -> str:
    """How a row's runner computes the DCN."""
    if r['form'] is not None:
        return FORM_TITLES[r['form']]
    return 'native' if r['model'] in FLOORS else 'no DCN'


def latency_table(rows: Sequence[Dict]) -> str:
    """Every runner of every model, beside PyTorch eager of that model."""
    lines = [
        '| model | input | threads | runtime | DCN form | median | '
        'vs PyTorch eager | nodes | max abs diff to PyTorch |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        base = next(
            b['ms']
            for b in rows
            if (b['model'], b['threads'], b['runtime'])
            == (r['model'], r['threads'], 'torch')
        )
        lines.append(
            f'| {r["model"]} | {_size(r)} | {r["threads"]} | '
            f'{RUNTIMES[r["runtime"]]} | {_form(r)} | {r["ms"]:.0f} ms | '
            f'{r["ms"] / base:.2f}x | '
            f'{"-" if r["nodes"] is None else r["nodes"]} | '
            f'{"-" if r["diff"] is None else format(r["diff"], ".1e")} |'
        )
    return '\n'.join(lines)


def floor_rows(rows: Sequence[Dict]) -> List[Dict]:
    """Per DyHead model, thread count and runtime: its fastest DCN form
    against the same runtime's floor model."""
    out = []
    for r in rows:
        floor = FLOORS.get(r['model'])
        if floor is None:
            continue
        same = [
            x
            for x in rows
            if (x['model'], x['threads'], x['runtime'])
            == (r['model'], r['threads'], r['runtime'])
        ]
        best = min(same, key=lambda x: x['ms'])
        if best is not r:
            continue
        base = [
            x
            for x in rows
            if (x['model'], x['threads'], x['runtime'], x['size'])
            == (floor, r['threads'], r['runtime'], r['size'])
        ]
        if base:
            out.append(dict(dyhead=r, floor=base[0]))
    return out


def floor_table(rows: Sequence[Dict]) -> str:
    pairs = floor_rows(rows)
    if not pairs:
        return ''
    lines = [
        '| model | input | threads | runtime | DyHead (fastest form) | '
        'floor | floor time | DyHead / floor |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for p in pairs:
        d, f = p['dyhead'], p['floor']
        lines.append(
            f'| {d["model"]} | {_size(d)} | {d["threads"]} | '
            f'{RUNTIMES[d["runtime"]]} | {d["ms"]:.0f} ms ({_form(d)}) | '
            f'{f["model"]} | {f["ms"]:.0f} ms | '
            f'{d["ms"] / f["ms"]:.2f}x |'
        )
    # The fastest DyHead runtime of each (model, input, threads).
    best = {}
    for p in pairs:
        d = p['dyhead']
        key = (d['model'], _size(d), d['threads'])
        if key not in best or d['ms'] < best[key]['dyhead']['ms']:
            best[key] = p
    lines.append('')
    for (model, size, t), p in best.items():
        d, f = p['dyhead'], p['floor']
        lines.append(
            f'- {model} {size}, {t} thread(s): fastest DyHead runtime '
            f'{RUNTIMES[d["runtime"]]} ({_form(d)}), '
            f'{d["ms"] / f["ms"]:.2f}x its {f["model"]}.'
        )
    return '\n'.join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument(
        '--models',
        nargs='+',
        choices=MODELS,
        default=list(MODELS),
        help='models to time (default: all; a DyHead model and its floor '
        'give the DyHead / floor table)',
    )
    p.add_argument(
        '--sizes',
        nargs='+',
        type=parse_size,
        default=None,
        metavar='HxW',
        help='input size per model, in --models order (default: tiny and '
        'tiny_atss 512x672, atss_r50_6b and atss_r50 800x1344)',
    )
    p.add_argument(
        '--threads',
        nargs='+',
        type=int,
        default=[1, 2],
        help='intra-op threads of torch, onnxruntime and OpenVINO '
        '(default: 1 2)',
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
    notes = []
    if not openvino_installed():
        notes.append('OpenVINO: not installed (pip install openvino)')
    os.makedirs(args.work_dir, exist_ok=True)
    with warnings.catch_warnings():
        # The exporter's deprecation notice, once per export.
        warnings.simplefilter('ignore', DeprecationWarning)
        entries = [
            prepare(name, size, args.work_dir)
            for name, size in zip(args.models, sizes)
        ]
        rows = bench(entries, args.threads, args.warmup, args.repeats, notes)
    command = 'python benchmarks/benchmark_onnx.py ' + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    import onnxruntime

    versions = f'onnxruntime {onnxruntime.__version__}'
    if openvino_installed():
        import openvino

        versions += f', OpenVINO {openvino.__version__.split("-")[0]}'
    parts = [
        f'`{command.strip()}`',
        '',
        f'{machine_info(torch.device("cpu"))}, {versions}; '
        f'load average before {load_before}, after {load_average()}; '
        f'batch 1, medians of {args.repeats} runs after {args.warmup} '
        f'warm-up, opset 19, dynamic axes (OpenVINO: compiled for the '
        f'input shape).',
        '',
        latency_table(rows),
    ]
    floors = floor_table(rows)
    if floors:
        parts += ['', floors]
    if notes:
        parts += [''] + [f'- {note}' for note in dict.fromkeys(notes)]
    text = '\n'.join(parts)
    print(text)
    out = args.out or osp.join(args.work_dir, 'table.md')
    with open(out, 'w') as f:
        f.write(text + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
