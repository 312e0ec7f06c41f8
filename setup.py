"""Build hook: ship configs/, tools/ and model-index.yml inside the wheel.

mim looks for them under ``mmdet_dyhead/.mim/``. They live at the repository
root (one copy, the one users read), and are copied into the build tree here,
the way OpenMMLab's own setup.py files do for ``bdist_wheel``. Nothing here
imports torch, so the build needs no isolation tricks.
"""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

MIM_ITEMS = ('configs', 'tools', 'model-index.yml')


class BuildWithMim(build_py):
    def run(self):
        super().run()
        root = os.path.dirname(os.path.abspath(__file__))
        mim_dir = os.path.join(self.build_lib, 'mmdet_dyhead', '.mim')
        os.makedirs(mim_dir, exist_ok=True)
        for item in MIM_ITEMS:
            src = os.path.join(root, item)
            dst = os.path.join(mim_dir, item)
            if not os.path.exists(src):
                continue
            if os.path.isdir(dst):
                shutil.rmtree(dst)
            if os.path.isdir(src):
                shutil.copytree(
                    src,
                    dst,
                    ignore=shutil.ignore_patterns('__pycache__', '*.pyc'),
                )
            else:
                shutil.copy2(src, dst)


setup(cmdclass={'build_py': BuildWithMim})
