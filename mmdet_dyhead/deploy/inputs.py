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
            must hold that config (set by :func:`build_detector`).
        image_paths (Sequence[str]): Image files.

    Returns:
        tuple: ``inputs`` (Tensor, (N, 3, H, W) float, padded batch) and the
        N ``DetDataSample`` objects holding each image's meta information
        (``img_shape``, ``scale_factor``, ``ori_shape``, ...).
    """
    import os.path as osp

    from mmcv.transforms import Compose
    from mmdet.utils import get_test_pipeline_cfg

    missing = [p for p in image_paths if not osp.isfile(p)]
    if missing:
        raise FileNotFoundError(f'image file(s) not found: {missing}.')
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


def build_detector(
    config, checkpoint=None, cfg_options=None, native_dcn: bool = False
):
    """Build a detector on CPU in eval mode, optionally loading weights.

    Args:
        config (str | Config): Config file or object.
        checkpoint (str, optional): Weights to load (mmengine format).
        cfg_options (dict, optional): ``--cfg-options`` style overrides.
        native_dcn (bool): Switch DyHead to ``dcn_backend='torch'`` first
            (see :func:`use_native_dcn`); needed for ONNX export.

    Returns:
        BaseDetector: The model, with ``model.cfg`` set to the config used.
    """
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint

    from .native_backend import use_native_dcn

    cfg = Config.fromfile(config) if isinstance(config, str) else config.copy()
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    if native_dcn:
        use_native_dcn(cfg.model)
    # Pretrained backbone weights are irrelevant when a checkpoint follows,
    # and torchvision:// URLs cannot be resolved without torchvision.
    if checkpoint is not None and isinstance(cfg.model.get('backbone'), dict):
        cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, map_location='cpu')
    model.cfg = cfg
    model.eval()
    return model
