"""FLOPs of ATSS + DyHead: paper Table 2 on a synthetic input, or mmdet's tool.

Two modes:

- ``python tools/get_flops.py table2 [--shape 800 1333]
  [--blocks 1 2 4 6 8 10]`` builds ATSS R-50 + FPN with mmdet's 4-conv
  towers (the baseline) and ATSS + N DyHead blocks with the towers removed,
  counts each on one synthetic image of the given shape (no dataset needed)
  with mmengine's ``get_model_complexity_info``, and prints/writes the table
  next to the paper's numbers.
- ``python tools/get_flops.py mmdet CONFIG [--num-images N]
  [--cfg-options ...]`` runs mmdet's own
  ``tools/analysis_tools/get_flops.py`` (which reads images from the
  config's val dataloader) after importing this package, with the DCN
  counting rules of :mod:`mmdet_dyhead.utils.flops` registered around it.

Both modes count inside
:func:`~mmdet_dyhead.utils.flops.flop_handles_registered`, which also adds
an activation rule for the DCN ops: mmengine's
``get_model_complexity_info`` counts activations with a handle table of its
own, and would otherwise report the DCN op as unsupported.

Counting convention (mmengine's): one multiply-add = one FLOP; conv, matmul,
the deformable conv (as the conv it generalises), norms and upsampling are
counted; cheap elementwise ops are not.
"""

import argparse
import copy
import os.path as osp
import runpy
import sys

import torch

from mmdet_dyhead.utils.flops import flop_handles_registered

from ._paths import config_path

DEFAULT_CONFIG = config_path('atss', 'atss_r50_fpn_dyhead-6b_1x_coco.py')
# Paper Table 2 (R-50, 800x1333): baseline GFLOPs and delta per block count.
PAPER_BASELINE = 254.39
PAPER_DELTAS = {
    1: -84.69,
    2: -63.45,
    4: -20.97,
    6: 21.50,
    8: 63.98,
    10: 106.46,
}


class _TensorForward(torch.nn.Module):
    """Detector backbone + neck + head on a tensor (what the analyzer
    traces).
    """

    def __init__(self, detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x):
        return self.detector._forward(x)


def model_cfgs(config: str, blocks):
    """(name, model cfg) for the baseline and every block count."""
    from mmengine.config import Config

    cfg = Config.fromfile(config)
    model = cfg.model
    model.backbone.init_cfg = None
    fpn = (
        model.neck[0] if isinstance(model.neck, (list, tuple)) else model.neck
    )
    dyhead = copy.deepcopy(model.neck[1])
    baseline = copy.deepcopy(model)
    baseline.neck = copy.deepcopy(fpn)
    # mmdet's plain ATSS head: 4 shared-structure convs per tower.
    baseline.bbox_head.stacked_convs = 4
    out = [('ATSS baseline (4-conv towers)', baseline)]
    for n in blocks:
        m = copy.deepcopy(model)
        m.bbox_head.stacked_convs = 0
        m.neck = [copy.deepcopy(fpn), dict(dyhead, num_blocks=n)]
        out.append((f'ATSS + {n} DyHead block{"s" if n > 1 else ""}', m))
    return out


def count_gflops(model_cfg, shape) -> float:
    from mmdet.registry import MODELS
    from mmengine.analysis import get_model_complexity_info
    from mmengine.registry import init_default_scope

    init_default_scope('mmdet')
    detector = MODELS.build(model_cfg).eval()
    x = torch.zeros(1, 3, *shape)
    with torch.no_grad():
        info = get_model_complexity_info(
            _TensorForward(detector),
            inputs=(x,),
            show_table=False,
            show_arch=False,
        )
    return info['flops'] / 1e9


def table2(args) -> str:
    import mmdet_dyhead  # noqa: F401  (registers DyHeadNeck)

    rows = []
    base = None
    for name, cfg in model_cfgs(args.config, args.blocks):
        g = count_gflops(cfg, args.shape)
        base = g if base is None else base
        rows.append((name, g))
        print(f'{name}: {g:.2f} GFLOPs', flush=True)
    h, w = args.shape
    lines = [
        f'| model ({h}x{w}) | GFLOPs | delta vs baseline | paper delta | '
        'delta per block (ours / paper) |',
        '|---|---|---|---|---|',
        f'| {rows[0][0]} | {rows[0][1]:.2f} | 0 | '
        f'0 (baseline {PAPER_BASELINE}) | - |',
    ]
    one = None
    for (name, g), n in zip(rows[1:], args.blocks):
        paper = PAPER_DELTAS.get(n)
        one = (n, g) if one is None else one
        per = '-'
        if n != one[0]:
            per_ours = (g - one[1]) / (n - one[0])
            per_paper = (
                (paper - PAPER_DELTAS[one[0]]) / (n - one[0])
                if paper is not None and one[0] in PAPER_DELTAS
                else None
            )
            per = (
                f'{per_ours:.2f} / {per_paper:.2f}'
                if per_paper is not None
                else f'{per_ours:.2f}'
            )
        lines.append(
            f'| {name} | {g:.2f} | {g - base:+.2f} | '
            f'{"-" if paper is None else f"{paper:+.2f}"} | {per} |'
        )
    text = '\n'.join(lines)
    print(text)
    return text


def mmdet_script() -> str:
    """mmdet's ``tools/analysis_tools/get_flops.py`` in the installed
    wheel."""
    import mmdet

    return osp.join(
        osp.dirname(mmdet.__file__),
        '.mim',
        'tools',
        'analysis_tools',
        'get_flops.py',
    )


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        epilog='Run "%(prog)s MODE --help" for the options of a mode.',
    )
    modes = p.add_subparsers(dest='mode', metavar='MODE')
    modes.required = True
    t = modes.add_parser(
        'table2',
        help='paper Table 2: ATSS baseline and N DyHead blocks on one '
        'synthetic image (no dataset needed)',
        description='Counts ATSS R-50 + FPN with 4-conv towers and ATSS + '
        'N DyHead blocks (towers removed) on one synthetic image, and '
        "prints the table next to the paper's numbers.",
    )
    t.add_argument(
        '--config',
        default=DEFAULT_CONFIG,
        help='DyHead config whose backbone, FPN and DyHeadNeck settings '
        'are used, the block count replaced by --blocks (default: '
        f'configs/atss/{osp.basename(DEFAULT_CONFIG)})',
    )
    t.add_argument(
        '--shape',
        type=int,
        nargs=2,
        default=[800, 1333],
        metavar=('H', 'W'),
        help='input image height and width in pixels (default: 800 1333)',
    )
    t.add_argument(
        '--blocks',
        type=int,
        nargs='+',
        default=[1, 2, 4, 6, 8, 10],
        metavar='N',
        help='DyHead block counts, one row each (default: 1 2 4 6 8 10)',
    )
    t.add_argument(
        '--out',
        metavar='FILE',
        help='also write the markdown table to FILE',
    )
    m = modes.add_parser(
        'mmdet',
        help="mmdet's tools/analysis_tools/get_flops.py (images from the "
        "config's val dataloader) with the DCN counting rules",
        description="Runs mmdet's own tools/analysis_tools/get_flops.py "
        'after importing this package, with the FLOP and activation rules '
        'of the deformable convs registered around it. The arguments are '
        "passed to mmdet's script unchanged.",
    )
    m.add_argument(
        'config',
        help="detector config; its val dataloader's images are measured",
    )
    m.add_argument(
        '--num-images',
        type=int,
        default=100,
        metavar='N',
        help="images to average over (mmdet's option; default: 100)",
    )
    m.add_argument(
        '--cfg-options',
        nargs='+',
        metavar='KEY=VALUE',
        help="override config settings (mmdet's option), e.g. "
        'val_dataloader.dataset.data_root=data/coco/',
    )
    args, unknown = p.parse_known_args(argv)
    if unknown and args.mode != 'mmdet':
        p.error(f'unrecognized arguments: {" ".join(unknown)}')
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.mode == 'mmdet':
        import mmdet_dyhead  # noqa: F401  (registers DyHeadNeck)

        script = mmdet_script()
        # mmdet's script parses the command line itself; hand it over as
        # given (options it does not know stop there, with its message).
        saved_argv, sys.argv = sys.argv, [script] + argv[1:]
        try:
            with (
                flop_handles_registered()
            ):  # the DCN rules, while mmdet counts
                runpy.run_path(script, run_name='__main__')
        finally:
            sys.argv = saved_argv
        return
    with flop_handles_registered():  # the DCN rules, while table2 counts
        text = table2(args)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(text + '\n')


if __name__ == '__main__':
    main()
