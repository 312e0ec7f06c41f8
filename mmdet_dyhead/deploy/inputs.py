"""Turn image files into the tensor a detector's ``_forward`` takes."""

from typing import List, Sequence, Tuple

import torch
from torch import Tensor


def load_images(model, image_paths: Sequence[str]) -> Tuple[Tensor, List]:
    """Run images through the config's test pipeline and data preprocessor.

    The same steps as ``mmdet.apis.inference_detector`` (resize, pack,
    normalise, pad to the preprocessor's size divisor), stopped before the
    model, so exported graphs and hooks see exactly what ``predict`` sees.

    Args:
        model (BaseDetector): A detector built from a config; ``model.cfg``
            must hold that config (``mmdet.apis.init_detector`` sets it).
        image_paths (Sequence[str]): Image files.

    Returns:
        tuple: ``inputs`` (Tensor, (N, 3, H, W) float, padded batch) and the
        N ``DetDataSample`` objects holding each image's meta information
        (``img_shape``, ``scale_factor``, ``ori_shape``, ...).
    """

    from mmcv.transforms import Compose
    from mmdet.utils import get_test_pipeline_cfg

    check_images(image_paths)
    pipeline_cfg = get_test_pipeline_cfg(model.cfg.copy())
    # Keep only what inference needs; annotation loaders fail on bare images.
    pipeline_cfg = [
        t for t in pipeline_cfg if 'Annotations' not in str(t['type'])
    ]
    pipeline = Compose(pipeline_cfg)
    items = [
        pipeline(dict(img_path=p, img_id=i)) for i, p in enumerate(image_paths)
    ]
    data = dict(
        inputs=[d['inputs'] for d in items],
        data_samples=[d['data_samples'] for d in items],
    )
    with torch.no_grad():
        data = model.data_preprocessor(data, False)
    return data['inputs'], data['data_samples']


def check_images(image_paths: Sequence[str]) -> None:
    """Refuse missing, empty or undecodable image files by name.

    OpenCV would otherwise stop deep inside the pipeline with
    ``!buf.empty()`` and no file name.

    Args:
        image_paths (Sequence[str]): Image files.

    Raises:
        FileNotFoundError: A file does not exist.
        ValueError: A file is empty or not an image OpenCV can decode.
    """
    import os.path as osp

    import cv2

    missing = [p for p in image_paths if not osp.isfile(p)]
    if missing:
        raise FileNotFoundError(f'image file(s) not found: {missing}.')
    for path in image_paths:
        if osp.getsize(path) == 0:
            raise ValueError(
                f'image file {path} is empty (0 bytes): an interrupted copy '
                f'or download. Fix: copy it again, or leave it out.'
            )
        if cv2.imread(path, cv2.IMREAD_UNCHANGED) is None:
            raise ValueError(
                f'image file {path} is not an image OpenCV can read '
                f'(corrupt, or another kind of file). Fix: check the file, '
                f'or leave it out.'
            )
