"""benchmarks/benchmark_onnx.py stays runnable and its table stays true.

A smoke run on the test suite's tiny detector: both export forms are
written, timed beside PyTorch, and their outputs agree with PyTorch's
(the table's last column), so a broken export path or a renamed argument
shows up here rather than in the next benchmark session.
"""

import re
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT, subprocess_env


@pytest.mark.slow
def test_tiny_run_writes_a_table_whose_outputs_match_pytorch(tmp_path):
    out = tmp_path / 'table.md'
    res = subprocess.run(
        [
            sys.executable,
            f'{REPO_ROOT}/benchmarks/benchmark_onnx.py',
            '--models',
            'tiny',
            '--sizes',
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
        ],  # fmt: skip
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=str(tmp_path),
        timeout=600,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    rows = [r for r in out.read_text().splitlines() if r.startswith('| tiny')]
    assert len(rows) >= 1
    cells = [c.strip() for c in rows[0].strip('|').split('|')]
    assert cells[1] == '128x160' and cells[2] == '1'
    # Last column: max abs difference to PyTorch, DeformConv / grid_sample.
    diffs = [float(v) for v in re.findall(r'[0-9.]+e[-+][0-9]+', cells[-1])]
    assert len(diffs) == 2 and max(diffs) < 1e-4, cells[-1]
    # Both forms were written where --work-dir says.
    names = sorted(p.name for p in (tmp_path / 'work').iterdir())
    assert names == ['tiny_deform_conv.onnx', 'tiny_grid_sample.onnx']
