"""Zoo weights on this machine: list, fetch, or place a file got elsewhere.

See --help; the logic is in mmdet_dyhead/cli/zoo.py.
"""

import os.path as osp
import sys

# Runs from a checkout without installing the package.
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmdet_dyhead.cli.zoo import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
