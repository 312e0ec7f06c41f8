"""Write the synthetic COCO-format detection dataset (no download needed).

See --help; the logic is in mmdet_dyhead/cli/generate_synthetic_coco.py.
"""

import os.path as osp
import sys

# Runs from a checkout without installing the package.
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmdet_dyhead.cli.generate_synthetic_coco import main  # noqa: E402

if __name__ == '__main__':
    main()
