"""mmdet's tools/train.py with mmdet-dyhead's checks and CPU options.

Usage is exactly mmdet's: python tools/train.py CONFIG ... (see --help).
"""

from mmdet_dyhead.cli.train import main

if __name__ == '__main__':
    main()
