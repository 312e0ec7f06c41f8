"""FLOPs of ATSS + DyHead: paper Table 2 on a synthetic input, or mmdet's tool.

See --help; the logic is in mmdet_dyhead/cli/get_flops.py.
"""

import os.path as osp
import sys

# Runs from a checkout without installing the package.
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmdet_dyhead.cli.get_flops import main  # noqa: E402

if __name__ == '__main__':
    main()
