"""Quickstart: ATSS with and without DyHead, trained and COCO-evaluated on CPU.

See --help; the logic is in mmdet_dyhead/cli/quickstart.py.
"""

import os.path as osp
import sys

# Runs from a checkout without installing the package.
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmdet_dyhead.cli.quickstart import main  # noqa: E402

if __name__ == '__main__':
    main()
