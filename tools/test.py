"""mmdet's tools/test.py with mmdet-dyhead's checks and CPU options.

Usage is exactly mmdet's: python tools/test.py CONFIG CHECKPOINT ... (see
--help).
"""

from mmdet_dyhead.cli.test import main

if __name__ == '__main__':
    main()
