"""Write the synthetic COCO-format detection dataset (no download needed).

Example:
    python projects/synthetic_coco/generate.py data/synthetic_coco \
        --num-train 400 --num-val 100 --image-size 192 --seed 0
"""

import argparse
import os.path as osp
import sys
import time

# Run from a checkout: the repository root holds projects/.
ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from projects.synthetic_coco import (  # noqa: E402
    SYNTHETIC_CLASSES,
    generate_synthetic_coco,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        'out_dir',
        help='output folder (new, empty, or an '
        'earlier synthetic dataset with --overwrite)',
    )
    parser.add_argument('--num-train', type=int, default=400)
    parser.add_argument('--num-val', type=int, default=100)
    parser.add_argument(
        '--num-test', type=int, default=0, help='a third split (0: none)'
    )
    parser.add_argument(
        '--image-size',
        type=int,
        nargs='+',
        default=[192],
        metavar='S',
        help='side, or height width, in pixels',
    )
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument(
        '--objects-per-image',
        type=int,
        nargs=2,
        default=[2, 8],
        metavar=('MIN', 'MAX'),
    )
    parser.add_argument(
        '--size-range',
        type=float,
        nargs=2,
        default=[0.05, 0.9],
        metavar=('MIN', 'MAX'),
        help='object side / shorter image side',
    )
    parser.add_argument('--clutter', type=float, default=0.5)
    parser.add_argument(
        '--overwrite',
        action='store_true',
        help='replace a dataset this tool wrote earlier',
    )
    parser.add_argument(
        '--reuse',
        action='store_true',
        help='keep a dataset this tool wrote earlier with the same options '
        '(with --overwrite: write it again when an option differs)',
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if len(args.image_size) not in (1, 2):
        raise SystemExit(
            '--image-size takes one value (square) or two (height width).'
        )
    size = (
        args.image_size[0]
        if len(args.image_size) == 1
        else tuple(args.image_size)
    )
    start = time.time()
    try:
        paths = generate_synthetic_coco(
            args.out_dir,
            num_train=args.num_train,
            num_val=args.num_val,
            num_test=args.num_test,
            image_size=size,
            seed=args.seed,
            overwrite=args.overwrite,
            reuse=args.reuse,
            objects_per_image=tuple(args.objects_per_image),
            size_range=tuple(args.size_range),
            clutter=args.clutter,
        )
    except (ValueError, TypeError, FileExistsError) as err:
        raise SystemExit(f'error: {err}')
    print(
        f'wrote {args.num_train} train + {args.num_val} val + '
        f'{args.num_test} test images '
        f'({", ".join(SYNTHETIC_CLASSES)}) in {time.time() - start:.1f} s'
    )
    for key, path in paths.items():
        print(f'  {key}: {path}')


if __name__ == '__main__':
    main()
