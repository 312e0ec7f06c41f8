"""benchmarks/gpu_check.py stays runnable on machines without a GPU.

The script is what a GPU session runs in one go; its CPU smoke mode runs
the same checks (mmcv's CPU kernel against the native path and mmdet's
``DyHead``, a bf16 AMP step, the training and neck benchmarks) at a tiny
size, so a broken import or a renamed argument shows up here, not on the
GPU machine.
"""

import subprocess
import sys

import pytest
import torch

from mmdet_dyhead.ops import mmcv_ops_available
from tests.helpers import REPO_ROOT, subprocess_env


@pytest.mark.slow
@pytest.mark.skipif(
    not mmcv_ops_available(), reason='needs mmcv built with its ops'
)
def test_cpu_smoke_run_passes_every_check(tmp_path):
    out = tmp_path / 'gpu_check' / 'report.md'
    res = subprocess.run(
        [
            sys.executable,
            f'{REPO_ROOT}/benchmarks/gpu_check.py',
            '--device',
            'cpu',
            '--quick',
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
    report = out.read_text()
    # Checks 1, 1b (both from both starting points) and 2, each with a
    # verdict.
    assert 'mmdet default (zero offsets)' in report
    assert 'random offsets' in report
    assert 'AMP training of ATSS-R50 + DyHeadNeck-6' in report
    # Check 1b: the compiled neck keeps the operator.
    assert 'keeps the DCN operator' in report
    verdicts = [
        line
        for line in report.splitlines()
        if line.startswith(('PASS', 'FAIL'))
    ]
    assert len(verdicts) == 3 and all(v.startswith('PASS') for v in verdicts)
    # Check 3: both benchmark tables, ours beside mmdet's DyHead.
    assert 'ATSS + DyHeadNeck-6' in report
    assert 'ATSS + mmdet DyHead-6' in report
    assert 'ours (torch)' in report
    # Everything goes to --out's folder, nothing to the working directory.
    assert [p.name for p in tmp_path.iterdir()] == ['gpu_check']


@pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is present')
def test_without_cuda_the_script_names_the_cpu_smoke_run(tmp_path):
    from benchmarks import gpu_check

    with pytest.raises(SystemExit) as err:
        gpu_check.main(['--out', str(tmp_path / 'r.md')])
    message = str(err.value.code)
    assert 'no CUDA device' in message
    assert '--device cpu --quick' in message
    assert not (tmp_path / 'r.md').exists()
