"""Table 1 of the DyHead paper (attention ablation) on the synthetic data.

See --help; the logic is in mmdet_dyhead/cli/study_ablation.py.
"""

import os.path as osp
import sys

# Runs from a checkout without installing the package.
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmdet_dyhead.cli.study_ablation import main  # noqa: E402

if __name__ == '__main__':
    main()
