"""A child process in which torch, mmcv, mmdet, mmengine and mmdet_dyhead
fail to import: where the torch-free runner must still run.

Import as ``from tests.torch_free import torch_free_env``.
"""

import os
import subprocess
import sys

HIDDEN = ('torch', 'mmcv', 'mmdet', 'mmengine', 'mmdet_dyhead')


def shim_dir(tmp_path) -> str:
    """A folder whose torch, mmcv, mmdet, mmengine and mmdet_dyhead raise
    ImportError; first on PYTHONPATH, it hides the installed ones."""
    d = tmp_path / 'no_torch'
    d.mkdir(exist_ok=True)
    for name in HIDDEN:
        (d / f'{name}.py').write_text(
            f'raise ImportError("{name} is not installed here")\n'
        )
    return str(d)


def torch_free_env(tmp_path, *paths: str, python: str = sys.executable):
    """``os.environ`` with the shim first on PYTHONPATH, then ``paths``.

    Checks that the shim works for ``python`` (importing torch fails).
    """
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join((shim_dir(tmp_path),) + paths)
    probe = subprocess.run(
        [python, '-c', 'import torch'], env=env, capture_output=True
    )
    assert probe.returncode != 0, 'the shim must hide torch'
    return env
