"""``tools/convert_official_dyhead.py``: convert a microsoft/DynamicHead
(detectron2) ATSS checkpoint to mmdet-dyhead.

The conversion itself is :mod:`mmdet_dyhead.checkpoint.convert`. Usage::

    python tools/convert_official_dyhead.py dyhead_r50_atss_fpn_1x.pth \\
        dyhead_r50_atss_official.pth --hash-name

then ``load_from = 'dyhead_r50_atss_official-<hash>.pth'`` in
``configs/atss/atss_r50-caffe_fpn_dyhead-6b_official_1x_coco.py``.
"""

import argparse
import os.path as osp
import sys

from mmdet_dyhead.checkpoint.convert import (
    DEFAULT_CONFIG,
    ConversionError,
    convert_file,
)

from ._paths import config_path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Convert a microsoft/DynamicHead (detectron2) ATSS '
        'checkpoint to mmdet-dyhead.'
    )
    parser.add_argument('src', help='official DynamicHead checkpoint (.pth)')
    parser.add_argument('dst', help='output checkpoint for mmdet-dyhead')
    parser.add_argument(
        '--config',
        default=None,
        help=f'config to verify against (default: {DEFAULT_CONFIG} '
        'of this checkout, or of the installed package)',
    )
    parser.add_argument(
        '--no-verify',
        action='store_true',
        help='skip building the model to check the keys',
    )
    parser.add_argument(
        '--hash-name',
        action='store_true',
        help='append -<sha256[:8]> to the output file name',
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = (
        None
        if args.no_verify
        else (
            args.config or config_path(osp.relpath(DEFAULT_CONFIG, 'configs'))
        )
    )
    try:
        out = convert_file(args.src, args.dst, config, args.hash_name)
    except (ConversionError, RuntimeError, FileNotFoundError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
