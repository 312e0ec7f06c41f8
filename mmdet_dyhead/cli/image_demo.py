"""``tools/image_demo.py``: detect objects in images with mmdet's
``DetInferencer``, as mmdet's ``demo/image_demo.py`` does.

mmdet's wheel does not ship its ``demo/`` folder; this tool takes the same
kind of command line for this package's configs (and any mmdet config)::

    python tools/image_demo.py IMAGE_OR_FOLDER CONFIG --weights CKPT

It writes the drawn images to ``OUT_DIR/vis`` and the predictions as JSON
to ``OUT_DIR/preds``. Checkpoints saved by mmengine's Runner are read
weights-only inside the package's scoped allow-list.
"""

import argparse
from typing import List, Optional

from mmdet_dyhead.cli.mmdet_tools import check_custom_imports


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Detect objects in images with mmdet DetInferencer.'
    )
    parser.add_argument('inputs', help='An image file, or a folder of images.')
    parser.add_argument(
        'model', help="A config file (this package's, or any mmdet config)."
    )
    parser.add_argument(
        '--weights',
        help='Checkpoint file, or dyhead://<model name> (docs/model_zoo.md). '
        'Without it the model keeps its initial weights.',
    )
    parser.add_argument(
        '--out-dir',
        default='work_dirs/image_demo',
        help='Where vis/ (drawn images) and preds/ (JSON) go. '
        'Default: %(default)s.',
    )
    parser.add_argument(
        '--device',
        default=None,
        help='cpu, cuda or cuda:N. Default: cuda if available, else cpu.',
    )
    parser.add_argument(
        '--pred-score-thr',
        type=float,
        default=0.3,
        help='Draw boxes scoring at least this. Default: %(default)s.',
    )
    parser.add_argument(
        '--batch-size', type=int, default=1, help='Images per forward pass.'
    )
    parser.add_argument(
        '--no-save-vis', action='store_true', help='Do not draw images.'
    )
    parser.add_argument(
        '--no-save-pred', action='store_true', help='Do not write JSON.'
    )
    parser.add_argument(
        '--print-result',
        action='store_true',
        help='Print the predictions to the terminal.',
    )
    return parser.parse_args(argv)


def build_inferencer(
    model: str, weights: Optional[str] = None, device: Optional[str] = None
):
    """``DetInferencer`` for ``model``, refusing a config that uses this
    package's types without ``custom_imports``, and reading ``weights``
    (also mmengine's own checkpoints) under torch's ``weights_only``.

    Args:
        model (str): Config file.
        weights (str, optional): Checkpoint path, URL or ``dyhead://`` name.
        device (str, optional): Torch device; default cuda if available.
    """
    from mmdet.apis import DetInferencer
    from mmengine.config import Config

    import mmdet_dyhead  # noqa: F401  (registers before the config builds)
    from mmdet_dyhead.utils import mmengine_safe_globals

    check_custom_imports(Config.fromfile(model), model)
    with mmengine_safe_globals():
        return DetInferencer(
            model=model, weights=weights, device=device, show_progress=False
        )


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    inferencer = build_inferencer(args.model, args.weights, args.device)
    return inferencer(
        args.inputs,
        batch_size=args.batch_size,
        pred_score_thr=args.pred_score_thr,
        out_dir=args.out_dir,
        no_save_vis=args.no_save_vis,
        no_save_pred=args.no_save_pred,
        print_result=args.print_result,
    )


if __name__ == '__main__':
    main()
