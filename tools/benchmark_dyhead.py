"""Time mmdet's DyHead against DyHeadNeck (each DCN backend), side by side.

See --help; the logic is in mmdet_dyhead/cli/benchmark_dyhead.py.
"""

import os.path as osp
import sys

# Runs from a checkout without installing the package.
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmdet_dyhead.cli.benchmark_dyhead import main  # noqa: E402

if __name__ == '__main__':
    main()
