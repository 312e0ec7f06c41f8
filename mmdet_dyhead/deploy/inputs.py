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


# Test-pipeline steps the torch-free runner (runtime.py) reproduces;
# annotation loading and packing do nothing to the image.
_PASSIVE_STEPS = ('LoadAnnotations', 'PackDetInputs')


def preprocess_settings(cfg) -> dict:
    """The test pipeline and data preprocessor as plain numbers.

    What :mod:`mmdet_dyhead.deploy.runtime` needs to turn an image file
    into the exported graph's input without mmcv: the decode, the resize
    and the normalisation and padding of ``DetDataPreprocessor``.

    Args:
        cfg (Config): The detector's config (``model.cfg``).

    Returns:
        dict: ``resize`` (``scale`` [w, h], ``keep_ratio``,
        ``interpolation``), ``mean``, ``std``, ``bgr_to_rgb``,
        ``pad_size_divisor`` and ``pad_value``; or, when a step has no
        equivalent in the runner, ``{'unsupported': <reason>}``.
    """
    from mmdet.utils import get_test_pipeline_cfg

    def name(step):
        t = step['type']
        return getattr(t, '__name__', str(t)).split('.')[-1]

    resize = None
    for step in get_test_pipeline_cfg(cfg.copy()):
        kind = name(step)
        if kind in _PASSIVE_STEPS:
            continue
        if kind == 'LoadImageFromFile':
            if step.get('color_type', 'color') != 'color' or step.get(
                'to_float32', False
            ):
                return dict(unsupported=f'{kind} {dict(step)}')
            continue
        if kind == 'Resize' and resize is None and step.get('scale'):
            scale = step['scale']
            if isinstance(scale, int):
                scale = (scale, scale)
            if step.get('backend', 'cv2') != 'cv2':
                return dict(unsupported=f'{kind} {dict(step)}')
            resize = dict(
                scale=[int(scale[0]), int(scale[1])],
                keep_ratio=bool(step.get('keep_ratio', False)),
                interpolation=step.get('interpolation', 'bilinear'),
            )
            continue
        return dict(unsupported=f'test pipeline step {dict(step)}')
    pre = cfg.model.get('data_preprocessor', {})
    if name(pre) != 'DetDataPreprocessor' or pre.get('batch_augments'):
        return dict(unsupported=f'data_preprocessor {dict(pre)}')
    mean = pre.get('mean')
    std = pre.get('std')
    return dict(
        resize=resize,
        mean=None if mean is None else [float(v) for v in mean],
        std=None if std is None else [float(v) for v in std],
        bgr_to_rgb=bool(pre.get('bgr_to_rgb') or pre.get('rgb_to_bgr')),
        pad_size_divisor=int(pre.get('pad_size_divisor', 1)),
        pad_value=float(pre.get('pad_value', 0)),
    )
