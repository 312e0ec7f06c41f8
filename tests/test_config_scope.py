"""``_base_ = 'mmdet_dyhead::<path>'`` in a user's config outside the repo.

mmengine resolves ``<package>::`` against the installed package's
``.mim/configs``; the tests skip where the package is not installed.
"""

import copy
import importlib.metadata
import subprocess
import sys

import pytest
from mmengine.config import Config
from mmengine.registry import HOOKS, MODELS, init_default_scope

from mmdet_dyhead.cli import train as train_tool
from mmdet_dyhead.engine import DyHeadCheckHook
from projects.synthetic_coco import generate_synthetic_coco, tiny_detector_cfg
from tests.helpers import subprocess_env

USER_CONFIG = """
_base_ = 'mmdet_dyhead::atss/atss_r50_fpn_dyhead-6b_1x_coco.py'
model = dict(neck=[
    dict(type='FPN', in_channels=[256, 512, 1024, 2048], out_channels=256,
         start_level=1, add_extra_convs='on_output', num_outs=5),
    dict(type='DyHeadNeck', in_channels=256, out_channels=256, num_blocks=4,
         num_levels=5),
])
"""


@pytest.fixture
def user_config(tmp_path):
    try:
        importlib.metadata.distribution('mmdet-dyhead')
    except importlib.metadata.PackageNotFoundError:
        pytest.skip('mmdet-dyhead is not installed; run `make install`')
    path = tmp_path / 'my_atss_dyhead-4b.py'
    path.write_text(USER_CONFIG)
    return path


def test_a_config_inherits_the_package_by_scope(user_config):
    cfg = Config.fromfile(str(user_config))
    assert cfg.model.neck[1].num_blocks == 4
    assert 'mmdet_dyhead' in cfg.custom_imports.imports
    # mmengine stamps the dicts the package's file introduces with its scope
    hook = cfg.custom_hooks[0]
    assert hook['_scope_'] == 'mmdet_dyhead'
    init_default_scope('mmdet')
    assert isinstance(HOOKS.build(hook), DyHeadCheckHook)
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    assert len(model.neck[1].dyhead_blocks) == 4


def test_other_packages_scopes_are_unchanged(user_config, tmp_path):
    """In a fresh interpreter: mmdet:: resolves as before; mmdet_dyhead::
    needs the package imported (mmengine reads _base_ before it runs
    custom_imports), as the docs say."""
    mmdet_user = tmp_path / 'mmdet_user.py'
    mmdet_user.write_text("_base_ = 'mmdet::atss/atss_r50_fpn_1x_coco.py'\n")
    code = (
        'from mmengine.config import Config\n'
        'import sys\n'
        'try:\n'
        f'    Config.fromfile({str(user_config)!r})\n'
        "    print('resolved without import')\n"
        'except AssertionError as e:\n'
        "    print('refused:', e)\n"
        'import mmdet_dyhead\n'
        f'cfg = Config.fromfile({str(user_config)!r})\n'
        "print('blocks', cfg.model.neck[1].num_blocks)\n"
        f'base = Config.fromfile({str(mmdet_user)!r})\n'
        "print('mmdet', base.model.type)\n"
    )
    out = subprocess.run(
        [sys.executable, '-c', code],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith('refused: mmengine does not support'), lines
    assert lines[1:] == ['blocks 4', 'mmdet ATSS']


@pytest.mark.slow
def test_the_train_tool_runs_a_scope_inheriting_config(user_config, tmp_path):
    data = generate_synthetic_coco(
        str(tmp_path / 'data'),
        num_train=2,
        num_val=2,
        image_size=64,
        objects_per_image=(2, 3),
    )
    cfg = tiny_detector_cfg(
        str(user_config),
        data,
        str(tmp_path / 'work'),
        iters=2,
        checkpoint_interval=2,
    )
    cfg = copy.deepcopy(cfg)
    cfg.experiment_name = 'scope'
    config = tmp_path / 'tiny.py'
    cfg.dump(str(config))
    assert "_scope_='mmdet_dyhead'" in config.read_text()
    train_tool.main([str(config)])
    assert (tmp_path / 'work' / 'iter_2.pth').is_file()
