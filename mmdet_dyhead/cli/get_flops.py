"""FLOPs of ATSS + DyHead: paper Table 2 on a synthetic input, or mmdet's tool.

Two modes:

- ``python tools/get_flops.py table2 [--shape 800 1333]
  [--blocks 1 2 4 6 8 10]`` builds ATSS R-50 + FPN with mmdet's 4-conv
  towers (the baseline) and ATSS + N DyHead blocks with the towers removed,
  counts each on one synthetic image of the given shape (no dataset needed)
  with mmengine's ``get_model_complexity_info``, and prints/writes the table
  next to the paper's numbers.
- ``python tools/get_flops.py mmdet CONFIG [mmdet get_flops.py args]`` runs
  mmdet's own ``tools/analysis_tools/get_flops.py`` (which reads images from
  the config's val dataloader) after importing this package, with the DCN
  counting rules of :mod:`mmdet_dyhead.utils.flops` registered around it.

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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == 'mmdet':
        import mmdet

        import mmdet_dyhead  # noqa: F401
        from mmdet_dyhead.utils.flops import flop_handles_registered

        script = osp.join(
            osp.dirname(mmdet.__file__),
            '.mim',
            'tools',
            'analysis_tools',
            'get_flops.py',
        )
        sys.argv = [script] + argv[1:]
        with flop_handles_registered():  # the DCN rules, while mmdet counts
            runpy.run_path(script, run_name='__main__')
        return
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('mode', choices=['table2'])
    p.add_argument('--config', default=DEFAULT_CONFIG)
    p.add_argument('--shape', type=int, nargs=2, default=[800, 1333])
    p.add_argument(
        '--blocks', type=int, nargs='+', default=[1, 2, 4, 6, 8, 10]
    )
    p.add_argument('--out', help='also write the markdown table here')
    args = p.parse_args(argv)
    from mmdet_dyhead.utils.flops import flop_handles_registered

    with flop_handles_registered():  # the DCN rules, while table2 counts
        text = table2(args)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(text + '\n')
