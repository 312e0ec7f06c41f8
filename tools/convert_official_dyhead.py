"""Convert an official DynamicHead (detectron2) ATSS checkpoint to our layout.

See --help; the logic is in mmdet_dyhead/checkpoint/convert.py.
"""

import os.path as osp
import sys

# Runs from a checkout without installing the package.
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmdet_dyhead.cli.convert_official_dyhead import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
