"""``tools/image_demo.py``: detect objects in images with mmdet's
``DetInferencer``, as mmdet's ``demo/image_demo.py`` does.

mmdet's wheel does not ship its ``demo/`` folder; this tool takes the same
kind of command line for this package's configs (and any mmdet config)::

    python tools/image_demo.py IMAGE_OR_FOLDER CONFIG --weights CKPT

It writes the drawn images to ``OUT_DIR/vis`` and the predictions as JSON
to ``OUT_DIR/preds``. The weights are read by the package's weights-only
loader (:mod:`mmdet_dyhead.checkpoint`), and a checkpoint that leaves model
weights unloaded is refused unless ``--allow-partial-checkpoint`` is given.
"""

import argparse
import os.path as osp
from typing import List, Optional

from mmdet_dyhead.checkpoint import CheckpointError
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
        help='Checkpoint file, or dyhead://<model name> (dyhead-zoo list '
        'names them). Without it the model keeps its initial weights.',
    )
    parser.add_argument(
        '--allow-partial-checkpoint',
        action='store_true',
        help='Run with a checkpoint that leaves model weights unloaded '
        '(they keep their initial values); refused by default.',
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
    model: str,
    weights: Optional[str] = None,
    device: Optional[str] = None,
    allow_partial: bool = False,
):
    """``DetInferencer`` for ``model`` with ``weights`` read by the
    package's weights-only loader; refuses a config that uses this
    package's types without ``custom_imports`` and a checkpoint that leaves
    model weights unloaded (unless ``allow_partial``).

    Args:
        model (str): Config file.
        weights (str, optional): Checkpoint path, URL or ``dyhead://`` name.
        device (str, optional): Torch device; default cuda if available.
        allow_partial (bool): Accept a checkpoint that leaves model weights
            unloaded (warned).
    """
    from mmdet.apis import DetInferencer
    from mmengine.config import Config

    import mmdet_dyhead  # noqa: F401  (registers before the config builds)
    from mmdet_dyhead.checkpoint import checkpoint_loaders, load_weights

    check_custom_imports(Config.fromfile(model), model)

    class CheckedDetInferencer(DetInferencer):
        def _load_weights_to_model(self, model, checkpoint, cfg):
            if checkpoint is not None:
                load_weights(model, checkpoint, weights, allow_partial)
            super()._load_weights_to_model(model, checkpoint, cfg)

    with checkpoint_loaders():
        return CheckedDetInferencer(
            model=model, weights=weights, device=device, show_progress=False
        )


def image_files(inputs: str) -> List[str]:
    """The local image files ``inputs`` names: itself, or the images of a
    folder as DetInferencer lists them (URLs are left to it).

    Raises:
        ValueError: ``inputs`` is a folder without images (DetInferencer
            would run on nothing and exit 0); the message names the folder
            and the extensions it looks for.
    """
    from mmdet.apis.det_inferencer import IMG_EXTENSIONS
    from mmengine.fileio import list_dir_or_file

    if '://' in inputs:
        return []
    if not osp.isdir(inputs):
        return [inputs]
    files = [
        osp.join(inputs, name)
        for name in list_dir_or_file(
            inputs, list_dir=False, suffix=IMG_EXTENSIONS
        )
    ]
    if not files:
        raise ValueError(
            f'the folder {inputs} holds no images (files ending in '
            f'{", ".join(IMG_EXTENSIONS)}; subfolders are not searched); '
            f'give an image file or a folder of images.'
        )
    return files


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    from mmdet_dyhead.deploy.inputs import check_images

    try:
        check_images(image_files(args.inputs))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f'error: {err}') from err
    try:
        inferencer = build_inferencer(
            args.model,
            args.weights,
            args.device,
            args.allow_partial_checkpoint,
        )
    except CheckpointError as err:
        raise SystemExit(f'error: {err}') from err
    return inferencer(
        args.inputs,
        batch_size=args.batch_size,
        pred_score_thr=args.pred_score_thr,
        out_dir=args.out_dir,
        no_save_vis=args.no_save_vis,
        no_save_pred=args.no_save_pred,
        print_result=args.print_result,
    )


def console_main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the ``dyhead-image-demo`` console script.

    ``main`` returns the inferencer's results for callers in Python; a
    console script hands its return value to ``sys.exit``, which would
    print them and exit with status 1, so this returns nothing.

    Args:
        argv (list[str], optional): Arguments; default ``sys.argv[1:]``.
    """
    main(argv)


if __name__ == '__main__':
    console_main()
