"""The package imports, registers its names, and its configs build."""

import os

from mmengine.config import Config

import mmdet_dyhead
from mmdet_dyhead.registry import MODELS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_NAMES = ['DyHeadNeck', 'TaskAttnBBoxHead']


def test_import_registers_every_module_in_mmdet_registry():
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()  # mmdet's own DyHead must still coexist
    assert MMDET_MODELS.get('DyHead') is not None
    for name in OUR_NAMES:
        assert MMDET_MODELS.get(name) is not None, name
    assert mmdet_dyhead.__version__


def test_registry_builds_the_neck():
    neck = MODELS.build(
        dict(type='DyHeadNeck', in_channels=32, out_channels=32, num_blocks=1)
    )
    assert type(neck).__name__ == 'DyHeadNeck'


def test_config_inheriting_mmdet_builds_a_detector():
    from mmdet.utils import register_all_modules

    register_all_modules()
    cfg = Config.fromfile(
        os.path.join(REPO, 'configs/atss/atss_r50_fpn_dyhead-6b_1x_coco.py')
    )
    assert cfg.model.neck[1].type == 'DyHeadNeck'
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    assert type(model.neck[1]).__name__ == 'DyHeadNeck'
    assert len(model.neck[1].dyhead_blocks) == 6
