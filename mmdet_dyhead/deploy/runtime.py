"""The torch-free runner, under its former name.

The runner is the top-level module :mod:`mmdet_dyhead_runtime` of the same
wheel (``dyhead-run-onnx``, ``python -m mmdet_dyhead_runtime``): this
package's ``__init__`` imports torch, a module inside it cannot run where
torch is missing. This file keeps ``mmdet_dyhead.deploy.runtime`` imports
working and still runs by its path, without torch::

    python mmdet_dyhead/deploy/runtime.py model.onnx img1.jpg ...
"""

import os.path as osp
import sys

if __name__ == '__main__':
    # Run by its path: sys.path starts at this folder. The runner lies two
    # folders up, at the checkout's root or in site-packages.
    sys.path.insert(
        0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    )

from mmdet_dyhead_runtime import *  # noqa: E402, F401, F403
from mmdet_dyhead_runtime import __all__, main  # noqa: E402, F401

if __name__ == '__main__':
    sys.exit(main())
