"""The package imports, registers its names, and its configs build."""
import os

import pytest
from mmengine.config import Config

import mmdet_dyhead
from mmdet_dyhead.registry import MODELS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_NAMES = ['DyHeadNeck', 'DyHeadBlock', 'ScaleAwareAttention',
             'SpatialAwareAttention', 'TaskAwareAttention']


def test_import_registers_every_module_in_mmdet_registry():
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()  # mmdet's own DyHead must still coexist
    assert MMDET_MODELS.get('DyHead') is not None
    for name in OUR_NAMES:
        assert MMDET_MODELS.get(name) is not None, name
    assert mmdet_dyhead.__version__


def test_registry_builds_the_neck():
    neck = MODELS.build(dict(type='DyHeadNeck', in_channels=32, out_channels=32,
                             num_blocks=1))
    assert type(neck).__name__ == 'DyHeadNeck'


def test_config_inheriting_mmdet_builds_a_detector():
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(os.path.join(REPO, 'configs/atss/atss_r50_fpn_dyhead-6b_1x_coco.py'))
    assert cfg.model.neck[1].type == 'DyHeadNeck'
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    assert type(model.neck[1]).__name__ == 'DyHeadNeck'
    assert len(model.neck[1].dyhead_blocks) == 6


def test_plain_import_enables_checked_loading_and_cpu_launcher():
    """A fresh interpreter that only imports the package (as custom_imports
    does) gets the checked checkpoint loaders and, without an accelerator,
    the CPU path of mmengine's pytorch launcher."""
    import subprocess
    import sys

    from conftest import subprocess_env
    code = (
        'import torch, mmdet_dyhead\n'
        'from mmengine.runner.checkpoint import CheckpointLoader\n'
        'import mmengine.dist.utils as du\n'
        'import mmengine.runner.runner as rr\n'
        'from mmdet_dyhead.utils import checkpoint as ck\n'
        "assert CheckpointLoader._schemes['https://'] is ck.load_from_http_checked\n"
        "assert CheckpointLoader._schemes['http://'] is ck.load_from_http_checked\n"
        "assert CheckpointLoader._schemes[''] is ck.load_from_local_checked\n"
        'if not torch.cuda.is_available():\n'
        "    assert du._init_dist_pytorch.__module__ == 'mmdet_dyhead.engine.cpu_distributed'\n"
        "    assert rr.MMDistributedDataParallel.__name__ == 'CPUDistributedDataParallel'\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, '-c', code], env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr
