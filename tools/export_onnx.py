"""Export an mmdet detector with DyHead to ONNX (no custom operators).

See --help; the logic is in mmdet_dyhead/cli/export_onnx.py.
"""

import sys

from mmdet_dyhead.cli.export_onnx import main

if __name__ == '__main__':
    sys.exit(main())
