"""The package imports, registers its names, and its configs build."""

import ast
import glob
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
from mmengine.config import Config

import mmdet_dyhead
from mmdet_dyhead.registry import MODELS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_NAMES = ['DyHeadNeck', 'TaskAttnBBoxHead', 'DyHeadATSSHead']


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


# --- the package as a user installs it: a wheel, its commands and mim ------

# Every tool in mmdet_dyhead/cli/: its console script and a phrase of its
# --help (train/test print mmdet's own help: their scripts are mmdet's).
TOOLS = {
    'train': ('dyhead-train', 'Train a detector'),
    'test': ('dyhead-test', 'MMDet test (and eval) a model'),
    'image_demo': ('dyhead-image-demo', 'Detect objects in images'),
    'export_onnx': ('dyhead-export-onnx', 'Export an mmdet detector'),
    'zoo': ('dyhead-zoo', 'Zoo weights on this machine'),
    'get_flops': ('dyhead-get-flops', 'FLOPs of ATSS + DyHead'),
    'visualize_attention': (
        'dyhead-visualize-attention',
        "Plot what DyHead's attentions do",
    ),
    'convert_official_dyhead': (
        'dyhead-convert-official',
        'Convert a microsoft/DynamicHead',
    ),
}
CLI_HELPERS = {'__init__', '_paths', 'mmdet_tools'}
# The torch-free runner: a top-level module of the wheel, not in cli/
# (importing mmdet_dyhead imports torch).
RUNNER_SCRIPT = ('dyhead-run-onnx', 'mmdet_dyhead_runtime:main')


def _pyproject():
    # setuptools' reader: tomllib is Python 3.11+, the package supports 3.10.
    from setuptools.config.pyprojecttoml import load_file

    return load_file(os.path.join(REPO, 'pyproject.toml'))


def test_every_tool_runs_as_a_module_and_has_a_console_script():
    cli = os.path.join(REPO, 'mmdet_dyhead', 'cli')
    modules = {
        os.path.basename(p)[:-3] for p in glob.glob(os.path.join(cli, '*.py'))
    }
    assert modules - CLI_HELPERS == set(TOOLS)
    scripts = _pyproject()['project']['scripts']
    for tool, (script, _) in TOOLS.items():
        with open(os.path.join(cli, f'{tool}.py')) as f:
            tree = ast.parse(f.read())
        guards = [
            node
            for node in tree.body
            if isinstance(node, ast.If)
            and ast.unparse(node.test) == "__name__ == '__main__'"
        ]
        # Without it `python -m mmdet_dyhead.cli.<tool>` imports the tool
        # and exits 0 having done nothing.
        assert guards, f'{tool}.py has no __main__ guard'
        target = scripts[script]
        module, func = target.split(':')
        assert module == f'mmdet_dyhead.cli.{tool}', target
        assert callable(getattr(importlib.import_module(module), func))
    assert scripts[RUNNER_SCRIPT[0]] == RUNNER_SCRIPT[1]
    assert set(scripts) == {s for s, _ in TOOLS.values()} | {RUNNER_SCRIPT[0]}


def test_mim_extra_holds_mims_imports_and_not_openmim():
    """openmim's own requirements send pip through 32 openxlab versions and
    downgrade setuptools; the extra lists what mim imports instead, the same
    list scripts/install.sh installs next to `--no-deps openmim`."""
    extra = _pyproject()['project']['optional-dependencies']['mim']
    names = {re.split(r'[<>=!~ ]', req)[0].lower() for req in extra}
    assert not any('openmim' in n or 'openxlab' in n for n in names)
    with open(os.path.join(REPO, 'scripts', 'install.sh')) as f:
        line = next(x for x in f if x.startswith('MIM_DEPS=('))
    # pip and setuptools: installed by the script's earlier steps.
    assert names - {'pip', 'setuptools'} == set(re.findall(r'"([^"]+)"', line))


# Run inside the installed wheel's venv, from a folder outside the checkout:
# every tool's --help by each of the three routes a user has, in one
# process, because each route costs a full import of torch and mmdet (about
# 8 s of CPU): `python -m` is runpy.run_module(..., alter_sys=True), a
# console script calls its entry point and exits with what it returns, and
# `mim run` runs the tool's file in .mim/tools. The routes run module first:
# a module already imported would make runpy warn, which `python -m` in a
# fresh process never does.
PROBE = r"""
import contextlib, io, json, os, runpy, sys
from importlib.metadata import entry_points

import mmdet_dyhead

tools = json.loads(sys.argv[1])
scripts = {ep.name: ep for ep in entry_points(group='console_scripts')}
mim_tools = os.path.join(os.path.dirname(mmdet_dyhead.__file__), '.mim',
                         'tools')


def call(fn, argv0):
    saved = sys.argv
    sys.argv = [argv0, '--help']
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                fn()
                code = 'returned without exiting'
            except SystemExit as exc:
                code = exc.code
    finally:
        sys.argv = saved
    return [code, out.getvalue(), err.getvalue()]


runs = {}
for tool in tools:
    runs[f'python -m {tool}'] = call(
        lambda: runpy.run_module(f'mmdet_dyhead.cli.{tool}',
                                 run_name='__main__', alter_sys=True), tool)
for tool, script in tools.items():
    runs[f'{script}'] = call(
        lambda: sys.exit(scripts[script].load()()), script)
for tool in tools:
    path = os.path.join(mim_tools, f'{tool}.py')
    runs[f'mim run {tool}'] = call(
        lambda: runpy.run_path(path, run_name='__main__'), path)
print(json.dumps(dict(file=mmdet_dyhead.__file__, runs=runs)))
"""


PURELIB = 'import sysconfig; print(sysconfig.get_path("purelib"))'


@pytest.fixture(scope='module')
def wheel_venv(tmp_path_factory):
    """The package built as a wheel and installed (not editable, no deps)
    into a fresh venv that sees this environment's torch, mmcv and mmdet.

    Returns:
        tuple: (venv folder, wheel file, a folder outside the checkout).
    """
    root = tmp_path_factory.mktemp('wheel')
    # Built from a copy: pip builds in the source folder, and the checkout
    # is shared with other processes (its build/ and *.egg-info too).
    src = root / 'src'
    src.mkdir()
    for item in ('pyproject.toml', 'setup.py', 'README.md', 'LICENSE'):
        shutil.copy(os.path.join(REPO, item), src)
    shutil.copy(os.path.join(REPO, 'mmdet_dyhead_runtime.py'), src)
    shutil.copy(os.path.join(REPO, 'model-index.yml'), src)
    for item in ('mmdet_dyhead', 'configs', 'tools'):
        shutil.copytree(
            os.path.join(REPO, item),
            src / item,
            # Not a kernel built in place: the wheel builds its own.
            ignore=shutil.ignore_patterns('__pycache__', '*.pyc', '*.so'),
        )
    pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check']
    subprocess.run(
        pip
        + ['wheel', '-q', '--no-deps', '--no-build-isolation']
        + [str(src), '-w', str(root / 'dist')],
        check=True,
        capture_output=True,
    )
    (wheel,) = (root / 'dist').glob('mmdet_dyhead-*.whl')
    venv = root / 'venv'
    subprocess.run(
        [sys.executable, '-m', 'venv', '--without-pip', str(venv)],
        check=True,
    )
    python = venv / 'bin' / 'python'
    subprocess.run(
        pip
        + ['--python', str(python), 'install', '-q', '--no-deps']
        + [str(wheel)],
        check=True,
        capture_output=True,
    )
    # The heavy stack comes from this environment's site-packages. Not by
    # `venv --system-site-packages`: that exposes the base interpreter's
    # site-packages, not this venv's. Added after the install, so pip
    # installed the wheel instead of finding this environment's copy, and
    # listed after the venv's own site-packages, so the wheel's copy wins.
    site = subprocess.run(
        [str(python), '-c', PURELIB],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    stack = {sysconfig.get_path('purelib'), sysconfig.get_path('platlib')}
    with open(os.path.join(site, 'zz_stack.pth'), 'w') as f:
        f.write('\n'.join(sorted(stack)) + '\n')
    outside = root / 'elsewhere'
    outside.mkdir()
    return venv, wheel, outside


def _user_env():
    env = dict(os.environ)
    # As a user runs: nothing of the checkout on the path, warnings as
    # Python shows them by default.
    for key in ('PYTHONPATH', 'PYTHONWARNINGS'):
        env.pop(key, None)
    return env


@pytest.mark.slow
def test_wheel_metadata_is_true(wheel_venv):
    _, wheel, _ = wheel_venv
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        dist = next(n.split('/')[0] for n in names if '.dist-info/' in n)
        meta = z.read(f'{dist}/METADATA').decode()
        entry_points = z.read(f'{dist}/entry_points.txt').decode()
    assert 'Requires-Python: <3.13,>=3.10' in meta
    assert 'License-Expression: Apache-2.0' in meta
    assert f'{dist}/licenses/LICENSE' in names
    assert 'openmim' not in meta
    assert 'mmdet_dyhead/.mim/model-index.yml' in names
    for tool, (script, _) in TOOLS.items():
        assert f'mmdet_dyhead/.mim/tools/{tool}.py' in names
        assert f'{script} = mmdet_dyhead.cli.{tool}:' in entry_points
    assert 'mmdet_dyhead_runtime.py' in names
    assert ' = '.join(RUNNER_SCRIPT) in entry_points


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which(os.environ.get('CXX', 'c++')) is None
    and shutil.which('g++') is None,
    reason='no C++ compiler: the wheel is built without the kernel',
)
def test_wheel_built_next_to_torch_carries_the_compiled_kernel(wheel_venv):
    """Built without isolation (torch importable) and with a compiler, as
    scripts/install.sh builds, the wheel holds the C++ DCN kernel, and the
    installed kernel loads and computes outside the checkout."""
    venv, wheel, outside = wheel_venv
    with zipfile.ZipFile(wheel) as z:
        kernels = [
            n for n in z.namelist() if re.match(r'mmdet_dyhead/_ext\.', n)
        ]
    assert kernels, 'no mmdet_dyhead/_ext.* in the wheel'
    probe = (
        'import torch, mmdet_dyhead\n'
        'from mmdet_dyhead import _ext\n'
        'x = torch.randn(1, 4, 5, 6)\n'
        'w = torch.randn(3, 4, 3, 3)\n'
        'out = _ext.dcn_forward(x, torch.zeros(1, 18, 5, 6), '
        'torch.ones(1, 9, 5, 6), w, None, 1, 1, 1, 1, 1, 1)\n'
        'ref = torch.nn.functional.conv2d(x, w, padding=1)\n'
        'print(_ext.__file__, float((out - ref).abs().max()))\n'
    )
    done = subprocess.run(
        [str(venv / 'bin' / 'python'), '-c', probe],
        cwd=outside,
        env=_user_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    path, err = done.stdout.split()
    assert path.startswith(str(venv)), path
    assert float(err) < 1e-4


@pytest.mark.slow
def test_every_tool_runs_from_the_installed_wheel_by_each_route(wheel_venv):
    venv, _, outside = wheel_venv
    python = str(venv / 'bin' / 'python')
    tools = {tool: script for tool, (script, _) in TOOLS.items()}
    # One process of each route for real (shebang script, `python -m`,
    # mim's subprocess), next to the in-process probe of all of them.
    real = {
        'python -m mmdet_dyhead.cli.zoo --help': (
            [python, '-m', 'mmdet_dyhead.cli.zoo', '--help'],
            'zoo',
        ),
        'dyhead-image-demo --help': (
            [str(venv / 'bin' / 'dyhead-image-demo'), '--help'],
            'image_demo',
        ),
        # mim's own -h/--help only knows OpenMMLab's codebases (a list in
        # mim 0.3.9); after `--` the option goes to the tool.
        'mim run mmdet_dyhead train -- --help': (
            [python, '-m', 'mim', 'run', 'mmdet_dyhead', 'train', '--']
            + ['--help'],
            'train',
        ),
    }
    procs = {
        name: subprocess.Popen(
            cmd,
            cwd=outside,
            env=_user_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (cmd, _) in real.items()
    }
    probe = subprocess.run(
        [python, '-c', PROBE, json.dumps(tools)],
        cwd=outside,
        env=_user_env(),
        capture_output=True,
        text=True,
    )
    # Importing the package prints nothing (no warnings either).
    assert probe.returncode == 0 and probe.stderr == '', probe.stderr[-3000:]
    result = json.loads(probe.stdout)
    assert result['file'].startswith(str(venv)), result['file']
    runs = result['runs']
    assert len(runs) == 3 * len(TOOLS)
    for route, (code, out, err) in runs.items():
        tool = route.split()[-1]
        tool = next(t for t, (s, _) in TOOLS.items() if tool in (t, s))
        assert code == 0, (route, code, err[-2000:])
        assert TOOLS[tool][1] in out, (route, out[:500])
        assert err == '', (route, err[-2000:])
        # Help a wheel user reads names no path they do not have.
        text = ' '.join(out.split())
        for m in re.finditer('docs/', text):
            near = text[m.start() : m.start() + 80]
            assert 'source repository' in near, (route, near)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        tool = real[name][1]
        assert proc.returncode == 0, (name, err[-2000:])
        assert TOOLS[tool][1] in out, (name, out[:500])
        assert 'Warning' not in err, (name, err[-2000:])


def _tiny_end_to_end_file(folder):
    """A tiny ATSS + DyHead (random weights, 1 block) exported with
    ``--postprocess`` (DeformConv form), and an image for it."""
    import cv2
    import numpy as np
    from mmdet.apis import init_detector

    from mmdet_dyhead.deploy import (
        export_onnx,
        img_shapes,
        load_images,
        use_native_dcn,
    )
    from projects.synthetic_coco.tiny_configs import (
        TEST_META_KEYS,
        shrink_model,
    )

    cfg = Config.fromfile(
        os.path.join(REPO, 'configs/atss/atss_r50_fpn_dyhead-6b_1x_coco.py')
    )
    shrink_model(cfg.model)
    cfg.model.neck[1].num_blocks = 1
    cfg.test_dataloader.dataset.pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(64, 64), keep_ratio=True),
        dict(type='PackDetInputs', meta_keys=TEST_META_KEYS),
    ]
    use_native_dcn(cfg.model)
    model = init_detector(cfg, device='cpu').eval()
    image = os.path.join(folder, 'image.png')
    rng = np.random.default_rng(0)
    cv2.imwrite(image, (rng.random((48, 80, 3)) * 255).astype(np.uint8))
    inputs, samples = load_images(model, [image])
    path = os.path.join(folder, 'model_e2e.onnx')
    export_onnx(
        model, inputs, path, postprocess=True, img_shape=img_shapes(samples)
    )
    return path, image


@pytest.mark.slow
def test_runner_command_runs_from_the_wheel_without_torch(
    wheel_venv, tmp_path
):
    """``dyhead-run-onnx`` and ``python -m mmdet_dyhead_runtime`` of the
    installed wheel, where torch, mmdet and mmdet_dyhead fail to import,
    give the same detections on an exported tiny detector."""
    pytest.importorskip('onnxruntime')
    from tests.torch_free import torch_free_env

    venv, _, outside = wheel_venv
    python = str(venv / 'bin' / 'python')
    model, image = _tiny_end_to_end_file(str(tmp_path))
    env = torch_free_env(tmp_path, python=python)
    env.pop('PYTHONWARNINGS', None)
    routes = {
        'script': [str(venv / 'bin' / RUNNER_SCRIPT[0])],
        'module': [python, '-m', 'mmdet_dyhead_runtime'],
    }
    found = {}
    for route, cmd in routes.items():
        proc = subprocess.run(
            cmd + [model, image],
            cwd=outside,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, (route, proc.stderr[-3000:])
        (line,) = proc.stdout.strip().splitlines()
        found[route] = json.loads(line)
        assert len(found[route]['labels']) > 10, found[route]
    assert found['script'] == found['module']
    where = subprocess.run(
        [python, '-c', 'import mmdet_dyhead_runtime as m; print(m.__file__)'],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert where.startswith(str(venv)), where
