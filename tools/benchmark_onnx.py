"""Time an exported DyHead detector in onnxruntime in both DCN forms.

See --help; the logic is in mmdet_dyhead/cli/benchmark_onnx.py.
"""

import os.path as osp
import sys

# Runs from a checkout without installing the package.
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmdet_dyhead.cli.benchmark_onnx import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
