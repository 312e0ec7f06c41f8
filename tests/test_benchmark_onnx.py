"""benchmarks/benchmark_onnx.py stays runnable and its tables stay true.

A smoke run on the test suite's tiny detector and its floor (the same
detector without DyHead): both export forms are written, timed beside
PyTorch in onnxruntime and (when installed) OpenVINO, their outputs agree
with PyTorch's (the latency table's last column), and the DyHead / floor
table pairs each runtime with the floor in the same runtime, so a broken
export path or a renamed argument shows up here rather than in the next
benchmark session.
"""

import importlib.util
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT, subprocess_env


def cells(row):
    return [c.strip() for c in row.strip('|').split('|')]


@pytest.mark.slow
def test_tiny_run_writes_tables_whose_outputs_match_pytorch(tmp_path):
    out = tmp_path / 'table.md'
    res = subprocess.run(
        [
            sys.executable,
            f'{REPO_ROOT}/benchmarks/benchmark_onnx.py',
            '--models',
            'tiny',
            'tiny_atss',
            '--sizes',
            '128x160',
            '128x160',
            '--threads',
            '1',
            '--warmup',
            '0',
            '--repeats',
            '1',
            '--work-dir',
            str(tmp_path / 'work'),
            '--out',
            str(out),
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=str(tmp_path),
        timeout=600,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    text = out.read_text()
    rows = [cells(r) for r in text.splitlines() if r.startswith('| tiny')]
    latency = [r for r in rows if len(r) == 9]
    runners = {(r[0], r[3], r[4]) for r in latency}
    expected = {
        ('tiny', 'PyTorch eager', 'native'),
        ('tiny', 'onnxruntime', 'DeformConv'),
        ('tiny', 'onnxruntime', 'grid_sample'),
        ('tiny_atss', 'PyTorch eager', 'no DCN'),
        ('tiny_atss', 'onnxruntime', 'no DCN'),
    }
    if importlib.util.find_spec('openvino'):
        expected |= {
            ('tiny', 'OpenVINO', 'DeformConv'),
            ('tiny', 'OpenVINO', 'grid_sample'),
            ('tiny_atss', 'OpenVINO', 'no DCN'),
        }
    assert runners == expected, text
    for r in latency:
        assert r[1] == '128x160' and r[2] == '1', r
        # Last column: max abs difference to PyTorch ('-' for PyTorch).
        if r[3] != 'PyTorch eager':
            assert float(r[-1]) < 1e-4, r
    # DyHead / floor: one row per runtime, the floor in the same runtime.
    floors = [r for r in rows if len(r) == 8]
    assert {r[3] for r in floors} == {x[1] for x in expected}, text
    for r in floors:
        assert r[0] == 'tiny' and r[5] == 'tiny_atss', r
        assert r[-1].endswith('x') and float(r[-1][:-1]) > 0, r
    assert 'fastest DyHead runtime' in text
    # Both forms of the DyHead model, one file of the floor, in --work-dir.
    names = sorted(p.name for p in (tmp_path / 'work').iterdir())
    assert names == [
        'tiny_atss.onnx',
        'tiny_deform_conv.onnx',
        'tiny_grid_sample.onnx',
    ]
