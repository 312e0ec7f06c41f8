"""Whole-detector CPU latency with and without DyHead (see --help)."""

import os.path as osp
import sys

# Runs from a checkout without installing the package.
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


from mmdet_dyhead.cli.benchmark_detectors import main  # noqa: E402

if __name__ == '__main__':
    main()
