"""DCN FLOP rules in mmengine's analyzer, checked against hand counts."""

import os
import os.path as osp

import pytest
import torch

from mmdet_dyhead.models import DyHeadNeck
from mmdet_dyhead.ops import ModulatedDeformConv, mmcv_ops_available
from mmdet_dyhead.utils.flops import FLOP_HANDLES
from tests.helpers import pyramid

BACKENDS = [
    'torch',
    pytest.param(
        'mmcv',
        marks=pytest.mark.skipif(
            not mmcv_ops_available(), reason='mmcv built without ops'
        ),
    ),
]


class _DCNLayer(torch.nn.Module):
    """A DCN whose offsets/masks come from inputs, so only it is counted."""

    def __init__(self, cin, cout, stride, backend):
        super().__init__()
        self.dcn = ModulatedDeformConv(
            cin, cout, 3, stride=stride, padding=1, backend=backend
        )

    def forward(self, x, offset, mask):
        return self.dcn(x, offset, mask)


class _Neck(torch.nn.Module):
    def __init__(self, neck):
        super().__init__()
        self.neck = neck

    def forward(self, *feats):
        return self.neck(feats)


def _analyze(model, inputs):
    from mmengine.analysis import FlopAnalyzer

    fa = FlopAnalyzer(model.eval(), inputs)
    fa.set_op_handle(**FLOP_HANDLES)  # explicit: importing registers nothing
    fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return fa


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('stride', [1, 2])
def test_single_dcn_counts_as_its_conv(backend, stride):
    n, cin, cout, h, w = 2, 6, 5, 9, 11
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    inputs = (
        torch.randn(n, cin, h, w),
        torch.randn(n, 18, ho, wo),
        torch.rand(n, 9, ho, wo),
    )
    fa = _analyze(_DCNLayer(cin, cout, stride, backend), inputs)
    # Hand count: one multiply-add per weight per output pixel.
    assert fa.total() == n * cout * ho * wo * cin * 3 * 3
    assert not any(
        'PythonOp' in op or 'deform_conv' in op for op in fa.unsupported_ops()
    )


@pytest.mark.parametrize('backend', BACKENDS)
def test_neck_counts_every_branch_once(backend):
    c, blocks = 16, 2
    feats = pyramid(1, c, (16, 20), levels=4)
    neck = DyHeadNeck(c, c, num_blocks=blocks, dcn_backend=backend)
    by_op = _analyze(_Neck(neck), tuple(feats)).by_operator()
    px = [f.shape[-2] * f.shape[-1] for f in feats]
    # mid on every level, low (stride 2) onto levels 1.., high on the
    # coarser level's grid for levels ..L-2: sum of output pixels.
    dcn_pixels = sum(px) + sum(px[1:]) + sum(px[1:])
    dcn = sum(
        v for k, v in by_op.items() if 'DeformConv' in k or 'deform_conv' in k
    )
    assert dcn == blocks * dcn_pixels * c * c * 9
    # Ordinary convs: the offset/mask conv (27 outputs, 3x3) on every level,
    # plus the attentions' 1x1 convs on pooled (1x1) maps: task attention
    # C -> C/4 -> 4C per level, scale attention C -> 1 per fused term
    # (2 terms at the pyramid ends, 3 inside).
    terms = 2 * 2 + 3 * (len(feats) - 2)
    attention = len(feats) * (c * c // 4 + c // 4 * 4 * c) + terms * c
    assert by_op['conv'] == blocks * (sum(px) * 27 * c * 9 + attention)


@pytest.mark.skipif(
    not mmcv_ops_available(), reason="mmdet's DyHead needs mmcv ops"
)
def test_mmdet_dyhead_and_ours_count_the_same_convs():
    from mmdet.models.necks import DyHead

    class _List(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *feats):
            return self.m(list(feats))

    c = 16
    feats = tuple(pyramid(1, c, (16, 20), levels=5))
    theirs = _analyze(_List(DyHead(c, c, num_blocks=1)), feats).by_operator()
    ours = _analyze(
        _Neck(DyHeadNeck(c, c, num_blocks=1, dcn_backend='torch')), feats
    ).by_operator()
    assert (
        theirs['PythonOp.ModulatedDeformConv2dFunction']
        == ours['modulated_deform_conv2d']
    )
    assert theirs['conv'] == ours['conv']


@pytest.mark.parametrize('backend', BACKENDS)
def test_dcn_activations_are_its_outputs_and_no_warning(backend):
    from mmengine.analysis import ActivationAnalyzer, complexity_analysis

    from mmdet_dyhead.utils.flops import flop_handles_registered

    acts = complexity_analysis._DEFAULT_SUPPORTED_ACT_OPS
    before = dict(acts)
    c = 16
    feats = tuple(pyramid(1, c, (16, 20), levels=4))
    model = _Neck(DyHeadNeck(c, c, num_blocks=2, dcn_backend=backend)).eval()
    dcn_op = {'torch': 'mmdet_dyhead::modulated_deform_conv2d'}.get(
        backend, 'prim::PythonOp.ModulatedDeformConv2dFunction'
    )
    dcn_ops = dcn_op.split('::')[1]  # how by_operator() names it
    # mmengine's own table has no DCN rule: the op is "unsupported" there,
    # which is what get_model_complexity_info used to warn about.
    plain = ActivationAnalyzer(model, feats)
    plain.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert dcn_ops not in plain.by_operator()
    assert dcn_op in plain.unsupported_ops()
    with flop_handles_registered():
        fa = ActivationAnalyzer(model, feats)
        fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_op = fa.by_operator()
        unsupported = fa.unsupported_ops()
    assert acts == before  # restored on exit
    assert not any(
        'DeformConv' in k or 'deform_conv' in k for k in unsupported
    )
    # C output channels per DCN output pixel: mid on every level, low
    # (stride 2) onto levels 1.., high on the coarser level's grid.
    px = [f.shape[-2] * f.shape[-1] for f in feats]
    dcn_pixels = sum(px) + sum(px[1:]) + sum(px[1:])
    assert by_op[dcn_ops] == 2 * dcn_pixels * c


def test_get_flops_help_lists_both_modes(capsys):
    from mmdet_dyhead.cli import get_flops

    with pytest.raises(SystemExit):
        get_flops.main(['--help'])
    out = capsys.readouterr().out
    assert 'table2' in out and 'mmdet' in out
    with pytest.raises(SystemExit):
        get_flops.main(['mmdet', '--help'])
    out = capsys.readouterr().out
    assert '--num-images' in out and '--cfg-options' in out
    with pytest.raises(SystemExit):
        get_flops.main(['table2', '--num-images', '3'])
    assert 'unrecognized arguments: --num-images 3' in capsys.readouterr().err


@pytest.mark.slow
def test_mmdet_mode_counts_a_dyhead_config_without_dcn_warning(tmp_path):
    import subprocess
    import sys

    from projects.synthetic_coco import generate_synthetic_coco
    from tests.helpers import REPO_ROOT, subprocess_env

    # The quickstart config reads data/synthetic_coco/ under the cwd.
    generate_synthetic_coco(
        str(tmp_path / 'data' / 'synthetic_coco'),
        num_train=1,
        num_val=1,
        image_size=64,
        seed=0,
    )
    config = osp.join(
        REPO_ROOT,
        'configs',
        'quickstart',
        'atss_r18-tiny_fpn_dyhead-2b_synthetic.py',
    )
    res = subprocess.run(
        [
            sys.executable,
            f'{REPO_ROOT}/tools/get_flops.py',
            'mmdet',
            config,
            '--num-images',
            '1',
        ],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    assert 'Input shape: (192, 192)' in log and 'Flops: ' in log
    # mmengine still names the ops it has no rule for (elementwise ops,
    # BN for activations...), but not the deformable conv.
    assert 'Unsupported operator aten::' in log
    assert 'modulated_deform_conv2d' not in log, log[-3000:]


def test_get_flops_registers_the_dcn_rules_itself(
    tmp_path, capsys, monkeypatch
):
    from mmengine.analysis import complexity_analysis

    from mmdet_dyhead.cli import get_flops

    # mmengine's defaults without the DCN rules, whatever ran before.
    defaults = {
        k: v
        for k, v in complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS.items()
        if k not in FLOP_HANDLES
    }
    act_defaults = {
        k: v
        for k, v in complexity_analysis._DEFAULT_SUPPORTED_ACT_OPS.items()
        if k not in FLOP_HANDLES
    }
    monkeypatch.setattr(
        complexity_analysis, '_DEFAULT_SUPPORTED_FLOP_OPS', dict(defaults)
    )
    monkeypatch.setattr(
        complexity_analysis, '_DEFAULT_SUPPORTED_ACT_OPS', dict(act_defaults)
    )
    out = tmp_path / 'table2.md'
    get_flops.main(
        [
            'table2',
            '--shape',
            '128',
            '192',
            '--blocks',
            '1',
            '2',
            '--out',
            str(out),
        ]
    )
    # Registered only while counting: mmengine's defaults are left as found.
    assert complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS == defaults
    assert complexity_analysis._DEFAULT_SUPPORTED_ACT_OPS == act_defaults
    gflops = {}
    for line in capsys.readouterr().out.splitlines():
        if line.endswith(' GFLOPs'):
            name, value = line.rsplit(': ', 1)
            gflops[name] = float(value.split()[0])
    assert list(gflops) == [
        'ATSS baseline (4-conv towers)',
        'ATSS + 1 DyHead block',
        'ATSS + 2 DyHead blocks',
    ]
    # One more block adds at least its three DCN branches (256 -> 256, 3x3)
    # over the P3-P7 output pixels of a 128x192 image: 16x24 .. 1x2, i.e.
    # mid on all 512 pixels, low and high on the 128 of P4-P7 each.
    dcn = (512 + 2 * 128) * 256 * 256 * 9 / 1e9
    delta = gflops['ATSS + 2 DyHead blocks'] - gflops['ATSS + 1 DyHead block']
    assert dcn <= delta < 1.2 * dcn
    assert len(out.read_text().splitlines()) == 5  # header, rule, 3 models


def test_benchmark_quick_mode_writes_a_table(tmp_path):
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT, subprocess_env

    docs = os.path.join(REPO_ROOT, 'docs', 'benchmarks.md')
    before = open(docs).read()
    # No --out: the table goes to work_dirs/benchmark_dyhead of the cwd.
    res = subprocess.run(
        [
            sys.executable,
            f'{REPO_ROOT}/benchmarks/benchmark_dyhead.py',
            '--quick',
            '--threads',
            '1',
            '--no-scaling',
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=str(tmp_path),
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert open(docs).read() == before
    assert os.listdir(tmp_path) == ['work_dirs']
    out = tmp_path / 'work_dirs' / 'benchmark_dyhead' / 'benchmarks.md'
    text = out.read_text()
    # The file records the command line that wrote it.
    assert (
        'Command: `python benchmarks/benchmark_dyhead.py --quick --threads 1 '
        '--no-scaling`'
    ) in text
    assert 'ours (torch)' in text and 'dense floor' in text
    if mmcv_ops_available():
        # Our outputs must equal mmdet's in the same run.
        row = next(
            line
            for line in text.splitlines()
            if line.startswith('| ours (torch)')
        )
        assert float(row.split('|')[-2]) < 1e-5


def test_benchmark_out_option_overrides_the_default(tmp_path):
    from benchmarks import benchmark_dyhead

    args = benchmark_dyhead.parse_args(['--out', str(tmp_path / 'b.md')])
    assert args.out == str(tmp_path / 'b.md')
    assert benchmark_dyhead.parse_args([]).out == os.path.join(
        'work_dirs', 'benchmark_dyhead', 'benchmarks.md'
    )
