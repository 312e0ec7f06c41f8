"""scripts/install.sh stops with a message that names the fix."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'scripts', 'install.sh')


def _run(env_overrides):
    env = dict(os.environ, **env_overrides)
    return subprocess.run(
        ['bash', SCRIPT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_missing_python_is_reported():
    proc = _run(
        {'PYTHON': '/nonexistent/python3', 'VENV': '/nonexistent/venv'}
    )
    assert proc.returncode != 0
    assert "'/nonexistent/python3' not found" in proc.stderr


def test_torch_too_new_for_mmcv_is_reported_with_the_fix(tmp_path):
    # A venv whose python sees a torch 2.14 (a stub package on its path).
    venv = tmp_path / 'venv'
    (venv / 'bin').mkdir(parents=True)
    stub = tmp_path / 'stub' / 'torch'
    stub.mkdir(parents=True)
    (stub / '__init__.py').write_text("__version__ = '2.14.1+cpu'\n")
    python = venv / 'bin' / 'python'
    python.write_text(
        f'#!/bin/sh\nPYTHONPATH={stub.parent} exec {sys.executable} -S "$@"\n'
    )
    python.chmod(0o755)
    proc = _run({'VENV': str(venv)})
    assert proc.returncode != 0
    assert 'torch 2.14.1+cpu' in proc.stderr
    assert "pip install 'torch==2.13.0'" in proc.stderr
