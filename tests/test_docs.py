"""Every shell and Python block of README.md and docs/ runs, or says why not.

A fenced block tagged ``bash``/``sh`` or ``python`` is run as it is written,
in a fresh process and a scratch folder where ``tools/`` and ``configs/``
are this checkout's. An HTML comment on the line before the fence changes
that:

- ``<!-- doc-test: skip: <reason> -->``: not run; the reason (data, GPU,
  network, minutes of CPU, a template with user-chosen names) is required.
- ``<!-- doc-test: config -->``: a config snippet; it is written to a file
  and loaded with ``Config.fromfile`` after ``import mmdet_dyhead`` (which
  resolves its ``_base_``).
- ``<!-- doc-test: tiny-detector -->``: run after a tiny ATSS + DyHead
  config, a checkpoint and images were made, named as the docs name them:
  ``CONFIG``, ``CHECKPOINT``, ``IMAGE``, ``IMAGE_OR_FOLDER`` (Python
  variables, and words replaced in shell blocks), ``demo.jpg``,
  ``images/``, ``my_config.py``, ``my_checkpoint.pth``.
"""

import glob
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
from typing import List, NamedTuple

import pytest

from tests.helpers import REPO_ROOT, subprocess_env

DOCS = ['README.md'] + sorted(
    osp.relpath(p, REPO_ROOT)
    for p in glob.glob(osp.join(REPO_ROOT, 'docs/*.md'))
)
RUNNABLE = {'bash': 'bash', 'sh': 'bash', 'shell': 'bash', 'python': 'python'}
MARKER = re.compile(r'<!--\s*doc-test:\s*(.*?)\s*-->')
FENCE = re.compile(r'^```(\w*)[^\n]*\n(.*?)^```', re.S | re.M)


class Block(NamedTuple):
    doc: str
    line: int
    lang: str
    code: str
    marker: str  # '' when none

    @property
    def id(self) -> str:
        return f'{self.doc}:{self.line}'


def blocks() -> List[Block]:
    found = []
    for doc in DOCS:
        with open(osp.join(REPO_ROOT, doc)) as f:
            text = f.read()
        for m in FENCE.finditer(text):
            lang = m.group(1).lower()
            if lang not in RUNNABLE:
                continue
            before = text[: m.start()].rstrip('\n').rsplit('\n', 1)[-1]
            mark = MARKER.search(before)
            found.append(
                Block(
                    doc,
                    text.count('\n', 0, m.start()) + 1,
                    RUNNABLE[lang],
                    m.group(2),
                    mark.group(1) if mark else '',
                )
            )
    return found


BLOCKS = blocks()
KNOWN = ('skip:', 'config', 'tiny-detector')


def test_every_block_runs_or_says_why():
    assert BLOCKS, 'no code blocks found'
    for b in BLOCKS:
        assert not b.marker or b.marker.startswith(KNOWN), (
            f'{b.id}: unknown marker {b.marker!r}; use one of {KNOWN}'
        )
        if b.marker.startswith('skip:'):
            reason = b.marker[len('skip:') :].strip()
            assert len(reason) > 10, f'{b.id}: a skip needs its reason'


@pytest.fixture
def scratch(tmp_path):
    """A folder per block with this checkout's tools/, configs/ and the
    experiments run from a checkout (outputs stay outside the repository)."""
    for item in (
        'tools',
        'configs',
        'model-index.yml',
        'benchmarks',
        'projects',
        'scripts',
    ):
        os.symlink(osp.join(REPO_ROOT, item), tmp_path / item)
    return tmp_path


@pytest.fixture(scope='module')
def tiny_files(tmp_path_factory):
    """A config, a checkpoint and images, made once per module."""
    import torch
    from mmdet.apis import init_detector
    from mmengine.registry import init_default_scope

    from projects.synthetic_coco import (
        generate_synthetic_coco,
        tiny_detector_cfg,
    )

    scratch = tmp_path_factory.mktemp('tiny')
    data = generate_synthetic_coco(
        str(scratch / 'synthetic'),
        num_train=1,
        num_val=2,
        image_size=96,
        objects_per_image=(2, 3),
    )
    cfg = tiny_detector_cfg(
        osp.join(REPO_ROOT, 'configs/atss/atss_r50_fpn_dyhead-6b_1x_coco.py'),
        data,
        str(scratch / 'work'),
    )
    cfg.dump(str(scratch / 'my_config.py'))
    init_default_scope('mmdet')
    model = init_detector(cfg.copy(), device='cpu')
    torch.save(
        {'meta': {}, 'state_dict': model.state_dict()},
        scratch / 'my_checkpoint.pth',
    )
    val = osp.join(data['data_root'], data['val_img_dir'])
    os.makedirs(scratch / 'images', exist_ok=True)
    for name in sorted(os.listdir(val)):
        shutil.copy(osp.join(val, name), scratch / 'images' / name)
    shutil.copy(
        scratch / 'images' / sorted(os.listdir(val))[0], scratch / 'demo.jpg'
    )
    return scratch


@pytest.fixture
def tiny(tiny_files, scratch):
    """CONFIG, CHECKPOINT and images in the block's folder."""
    for item in ('my_config.py', 'my_checkpoint.pth', 'images', 'demo.jpg'):
        os.symlink(tiny_files / item, scratch / item)
    return {
        'CONFIG': str(scratch / 'my_config.py'),
        'CHECKPOINT': str(scratch / 'my_checkpoint.pth'),
        'IMAGE_OR_FOLDER': str(scratch / 'images'),
        'IMAGE': str(scratch / 'demo.jpg'),
    }


def run(block: Block, cwd, names=None):
    env = subprocess_env()
    env['PATH'] = osp.dirname(sys.executable) + os.pathsep + env['PATH']
    env['MPLBACKEND'] = 'Agg'
    code = block.code
    if block.lang == 'python':
        if block.marker == 'config':
            path = osp.join(str(cwd), f'doc_config_{block.line}.py')
            with open(path, 'w') as f:
                f.write(code)
            code = (
                'import mmdet_dyhead\n'
                'from mmengine.config import Config\n'
                f'cfg = Config.fromfile({path!r})\n'
            )
        elif names:
            code = ''.join(f'{k} = {v!r}\n' for k, v in names.items()) + code
        cmd = [sys.executable, '-c', code]
    else:
        for k in sorted(names or {}, key=len, reverse=True):
            code = re.sub(rf'\b{k}\b', names[k], code)
        cmd = ['bash', '-euo', 'pipefail', '-c', code]
    out = subprocess.run(
        cmd,
        cwd=str(cwd),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, (
        f'{block.id} ({block.lang}) failed:\n{block.code}\n'
        f'{out.stdout[-2000:]}\n{out.stderr[-3000:]}'
    )


RUN = [b for b in BLOCKS if not b.marker.startswith('skip:')]


@pytest.mark.slow
@pytest.mark.parametrize('block', RUN, ids=[b.id for b in RUN])
def test_block_runs(block, scratch, request):
    names = None
    if block.marker == 'tiny-detector':
        names = request.getfixturevalue('tiny')
    run(block, scratch, names)
