"""Detect objects in images with mmdet's DetInferencer (see --help)."""

import os.path as osp
import sys

# Runs from a checkout without installing the package.
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


from mmdet_dyhead.cli.image_demo import main  # noqa: E402

if __name__ == '__main__':
    main()
