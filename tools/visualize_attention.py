"""Plot what DyHead's attentions do (paper Figures 3 and 4).

See --help; the logic is in mmdet_dyhead/cli/visualize_attention.py.
"""

import sys

from mmdet_dyhead.cli.visualize_attention import main

if __name__ == '__main__':
    sys.exit(main())
