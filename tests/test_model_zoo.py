"""Model zoo: metafiles, mmdet's released checkpoints, checked loading, mim."""

import filecmp
import glob
import os
import os.path as osp
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import yaml
from torch.hub import HASH_REGEX

from mmdet_dyhead.checkpoint import (
    CheckpointHashError,
    CheckpointKeyError,
    load_state_dict,
)
from mmdet_dyhead.checkpoint.files import default_cache_dir
from tests.helpers import REPO_ROOT, pyramid, rel_err


def mmdet_mim_dir():
    import mmdet

    return osp.join(osp.dirname(mmdet.__file__), '.mim')


def our_models():
    index = yaml.safe_load(open(osp.join(REPO_ROOT, 'model-index.yml')))
    models = []
    for rel in index['Import']:
        meta = yaml.safe_load(open(osp.join(REPO_ROOT, rel)))
        models += meta['Models']
    return index, models


# ----------------------------------------------------------------------------
# metafiles
# ----------------------------------------------------------------------------
def metafiles():
    """``{family folder: parsed metafile}`` for every metafile on disk."""
    return {
        osp.basename(osp.dirname(p)): yaml.safe_load(open(p))
        for p in sorted(
            glob.glob(osp.join(REPO_ROOT, 'configs/*/metafile.yml'))
        )
    }


def test_model_index_imports_every_metafile():
    index, models = our_models()
    on_disk = sorted(
        osp.relpath(p, REPO_ROOT)
        for p in glob.glob(osp.join(REPO_ROOT, 'configs/*/metafile.yml'))
    )
    assert sorted(index['Import']) == on_disk
    names = [m['Name'] for m in models]
    assert len(names) == len(set(names))


# The only metadata fields that may hold a box AP: the paper's number and
# the one microsoft/DynamicHead reports for its own weights. A measured AP
# goes in Results, and only next to the weights it was measured for.
NUMBER_FIELDS = {
    'Paper box AP': 'Paper Source',
    'Release box AP': 'Release Source',
}


def zoo_entries():
    return [
        (family, meta['Collections'], model)
        for family, meta in metafiles().items()
        for model in meta['Models']
    ]


@pytest.mark.parametrize(
    'family,collections,m',
    zoo_entries(),
    ids=[e[2]['Name'] for e in zoo_entries()],
)
def test_zoo_entry_is_consistent_and_honest(family, collections, m):
    # name, config, collection
    assert m['Config'] == f'configs/{family}/{m["Name"]}.py'
    assert osp.isfile(osp.join(REPO_ROOT, m['Config']))
    assert m['In Collection'] in [c['Name'] for c in collections]
    meta = m['Metadata']
    # no result without the weights it was measured for
    if 'Results' in m:
        assert 'Weights' in m, 'Results (a measured AP) without Weights'
        assert meta['Results Source'].startswith('mmdet model zoo')
        for result in m['Results']:
            assert set(result['Metrics']) == {'box AP'}
    if 'Weights' in m:
        assert 'Results' in m
        found = HASH_REGEX.search(osp.basename(m['Weights']))
        assert found, m['Weights']
        assert str(meta['Weights SHA256 Prefix']) == found.group(1)
    else:
        assert 'Weights SHA256 Prefix' not in meta
        assert 'Results Source' not in meta
    # paper (and release) numbers only in their own, named fields
    for key, value in meta.items():
        if 'AP' in key.split():
            assert key in NUMBER_FIELDS, f'{key}: {value}'
    for number, source in NUMBER_FIELDS.items():
        if number in meta:
            assert isinstance(meta[number], float) and source in meta
    assert ('Release box AP' in meta) == ('Release Source' in meta)
    # every entry says where its paper number is from, or that it has none
    found = re.fullmatch(
        r'paper Table ([1-5]) \(.+\), COCO (val2017|test-dev)',
        meta['Paper Source'],
    )
    if 'Paper box AP' in meta:
        assert found, meta['Paper Source']
        # the paper's Tables 4 and 5 are on test-dev, 1-3 on val2017
        assert (found.group(2) == 'test-dev') == (found.group(1) in '45')
    else:
        assert meta['Paper Source'].startswith('none (')
    # baselines are listed under their family but do not claim DyHead
    architecture = meta.get('Architecture') or next(
        c['Metadata']['Architecture']
        for c in collections
        if c['Name'] == m['In Collection']
    )
    assert ('DyHead' in architecture) == ('dyhead' in m['Name'])


def test_collections_are_named_after_the_family_users_search_for():
    names = []
    for family, meta in metafiles().items():
        (collection,) = meta['Collections']
        name = collection['Name']
        names.append(name)
        # what `mim search --model` compares with: the lower-cased name,
        # which is the family prefix of the configs' names
        assert name.lower() == family.replace('_', '-'), name
        for m in meta['Models']:
            assert m['In Collection'] == name
            assert m['Name'].startswith(name.lower()), m['Name']
        assert collection['Paper']['URL'] == 'https://arxiv.org/abs/2106.08322'
    assert len(names) == len(set(names))


def docs_table_numbers():
    """The AP cells of docs/configs.md, whose tables were read from the paper
    by hand, apart from the metafiles: ``({table number: paper APs in it},
    {config path: paper APs of its rows}, {config path: APs of its rows in
    the "AP elsewhere" tables})``."""
    by_table, paper, elsewhere = {}, {}, {}
    table, column = None, None
    ap = re.compile(r'(?<![\d.])(\d{2}\.\d)(?![\d])')
    for row in open(osp.join(REPO_ROOT, 'docs/configs.md')):
        heading = re.match(r'## Table (\d)', row)
        if heading:
            table = int(heading.group(1))
        if row.startswith('|') and 'AP' in row and '`' not in row:
            column = paper if 'Paper AP' in row else elsewhere
        found = re.search(r'`(configs/\S+\.py)`', row)
        if not (row.startswith('|') and found):
            continue
        cells = {float(x) for x in ap.findall(row.replace(found.group(0), ''))}
        column.setdefault(found.group(1), set()).update(cells)
        if column is paper:
            by_table.setdefault(table, set()).update(cells)
    return by_table, paper, elsewhere


def test_paper_and_release_numbers_are_the_ones_docs_configs_lists():
    by_table, paper, elsewhere = docs_table_numbers()
    _, models = our_models()
    checked = 0
    for m in models:
        meta = m['Metadata']
        if 'Paper box AP' in meta:
            table = int(re.match(r'paper Table (\d)', meta['Paper Source'])[1])
            assert meta['Paper box AP'] in by_table[table], m['Name']
            if m['Config'] in paper:  # a row of the paper itself
                assert meta['Paper box AP'] in paper[m['Config']], m['Name']
            checked += 1
        if 'Release box AP' in meta:
            assert meta['Release box AP'] in elsewhere[m['Config']]
            checked += 1
    assert checked >= 20


def test_released_weights_and_ap_are_mmdets():
    mmdet_meta = yaml.safe_load(
        open(osp.join(mmdet_mim_dir(), 'configs/dyhead/metafile.yml'))
    )
    released = {
        m['Weights']: m['Results'][0]['Metrics']['box AP']
        for m in mmdet_meta['Models']
    }
    _, models = our_models()
    ours = {
        m['Weights']: m['Results'][0]['Metrics']['box AP']
        for m in models
        if 'Weights' in m
    }
    assert ours == released  # all three released files, with mmdet's AP


def test_every_coco_config_is_listed():
    _, models = our_models()
    listed = {m['Config'] for m in models}
    configs = {
        osp.relpath(p, REPO_ROOT)
        for p in glob.glob(osp.join(REPO_ROOT, 'configs/*/*.py'))
    }
    assert not {c for c in configs if c.endswith('_coco.py')} - listed


# ----------------------------------------------------------------------------
# mmdet's released checkpoints load into our configs unchanged
# ----------------------------------------------------------------------------
def build(cfg_path, shrink_swin=False):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    import mmdet_dyhead  # noqa: F401

    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(cfg_path)
    cfg.model.backbone.init_cfg = None
    if shrink_swin:
        # Swin-L has 24 blocks; one per stage keeps every
        # channel count (and so the neck and head keys) as released.
        cfg.model.backbone.depths = [1, 1, 1, 1]
    return MODELS.build(cfg.model).eval()


CASES = [
    ('atss_r50_fpn_dyhead-6b_1x_coco', 'atss_r50_fpn_dyhead_1x_coco', False),
    (
        'atss_r50-caffe_fpn_dyhead-6b_1x_coco',
        'atss_r50-caffe_fpn_dyhead_1x_coco',
        False,
    ),
    (
        'atss_swin-l-p4-w12_fpn_dyhead-6b_ms-2x_coco',
        'atss_swin-l-p4-w12_fpn_dyhead_ms-2x_coco',
        True,
    ),
]


@pytest.mark.parametrize(
    'ours,theirs,shrink', CASES, ids=[c[0] for c in CASES]
)
def test_mmdet_checkpoint_loads_unchanged_with_same_outputs(
    ours, theirs, shrink, tmp_path
):
    from mmengine.runner.checkpoint import load_checkpoint

    ref = build(
        osp.join(mmdet_mim_dir(), f'configs/dyhead/{theirs}.py'), shrink
    )
    for m in ref.modules():  # mmdet's default offset init is zero: perturb it
        if m.__class__.__name__ == 'DyHeadBlock':
            nn.init.normal_(m.spatial_conv_offset.weight, std=0.01)
    path = tmp_path / f'{theirs}.pth'
    torch.save(
        {'meta': {'note': 'random init'}, 'state_dict': ref.state_dict()}, path
    )
    model = build(osp.join(REPO_ROOT, f'configs/atss/{ours}.py'), shrink)
    # mmengine's own entry point (what load_from uses); strict raises on any
    # missing, unexpected or mis-shaped key
    load_checkpoint(model, str(path), strict=True)
    feats = pyramid(1, 256, (12, 12), 5)
    with torch.no_grad():
        for a, b in zip(model.neck[1](feats), ref.neck[1](feats)):
            assert rel_err(a, b) < 1e-4
        if not shrink and 'caffe' not in ours:  # once end to end
            x = torch.randn(1, 3, 64, 64)
            for a, b in zip(
                *[
                    [t for lvl in m._forward(x) for t in lvl]
                    for m in (model, ref)
                ]
            ):
                assert rel_err(a, b) < 1e-4


def tiny_checkpoint(path):
    model = nn.Conv2d(3, 4, 3)
    torch.save({'meta': {}, 'state_dict': model.state_dict()}, path)
    return model


# ----------------------------------------------------------------------------
# grouped key report
# ----------------------------------------------------------------------------
def test_key_mismatch_is_reported_grouped_by_module():
    from mmdet_dyhead.models import DyHeadNeck

    official = DyHeadNeck(
        32, 32, num_blocks=6, preset='official', dcn_backend='torch'
    )
    mmdet_like = DyHeadNeck(
        32, 32, num_blocks=6, preset='mmdet', dcn_backend='torch'
    )
    state = dict(mmdet_like.state_dict())
    state['extra_head.0.weight'] = torch.zeros(1)
    state['extra_head.1.weight'] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError) as info:
        load_state_dict(official, state, strict=True)
    text = str(info.value)
    # 18 missing biases (3 branches x 6 blocks) in 3 lines, 2 extras in 1
    assert re.search(
        r'dyhead_blocks\.\{0-5\}\.spatial_attn\.high_branch\.conv: '
        r'bias \(6 keys\)',
        text,
    )
    assert 'extra_head.{0-1}: weight (2 keys)' in text
    assert "preset='mmdet'" in text
    assert len(text.splitlines()) < 10
    report = load_state_dict(official, state, strict=False)
    assert len(report.missing) == 18 and len(report.unexpected) == 2
    # what did match was loaded
    torch.testing.assert_close(
        official.dyhead_blocks[5].task_attn.fc2.weight,
        mmdet_like.dyhead_blocks[5].task_attn.fc2.weight,
    )
    out = official(pyramid(1, 32, (16, 16), 5))
    assert len(out) == 5


# ----------------------------------------------------------------------------
# mim search / download against the installed package
# ----------------------------------------------------------------------------
def installed_package_dir(tmp_path):
    """The installed mmdet_dyhead (not this source tree), or skip."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    out = subprocess.run(
        [
            sys.executable,
            '-c',
            'import importlib.util as u; '
            's = u.find_spec("mmdet_dyhead"); print(s.origin if s else "")',
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    origin = out.stdout.strip()
    if not origin or osp.dirname(osp.dirname(origin)) == REPO_ROOT:
        pytest.skip(
            'mmdet_dyhead is not installed non-editably in this env; '
            'run `bash scripts/install.sh` (CI does before the tests).'
        )
    pkg = osp.dirname(origin)
    stale = [
        rel
        for rel in ['model-index.yml']
        + [
            osp.relpath(p, REPO_ROOT)
            for p in glob.glob(osp.join(REPO_ROOT, 'configs/*/*'))
        ]
        if not osp.isfile(osp.join(pkg, '.mim', rel))
        or not filecmp.cmp(
            osp.join(REPO_ROOT, rel), osp.join(pkg, '.mim', rel), shallow=False
        )
    ]
    if stale:
        pytest.skip(
            f'the installed mmdet_dyhead at {pkg} is older than this '
            f'checkout ({stale[:3]} differ); run `bash scripts/install.sh`.'
        )
    return pkg, env


def mim(args, env, cwd):
    exe = osp.join(osp.dirname(sys.executable), 'mim')
    return subprocess.run(
        [exe] + args,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
    )


def mim_search_rows(stdout):
    """``{config id: {field: value}}`` from what ``mim search`` prints."""
    rows, row = {}, None
    for line in stdout.splitlines():
        found = re.fullmatch(r'config id: (\S+)', line.strip())
        if found:
            row = rows.setdefault(found.group(1), {})
        elif row is not None and re.match(r'\S+ {2,}\S', line):
            key, value = re.split(r' {2,}', line.strip(), maxsplit=1)
            row[key] = value
    return rows


def test_mim_search_lists_the_zoo_with_results_only_for_weights(tmp_path):
    _, env = installed_package_dir(tmp_path)
    out = mim(
        ['search', 'mmdet_dyhead', '--display-width', '400'], env, tmp_path
    )
    assert out.returncode == 0, out.stderr
    _, models = our_models()
    rows = mim_search_rows(out.stdout)
    assert sorted(rows) == sorted(m['Name'] for m in models)
    for m in models:
        row = rows[m['Name']]
        if 'Weights' in m:
            assert row['weight'] == m['Weights']
            assert (
                float(row['coco/box_ap'])
                == (m['Results'][0]['Metrics']['box AP'])
            )
            assert row['weights_sha256_prefix'] == str(
                m['Metadata']['Weights SHA256 Prefix']
            )
        else:  # no column that reads as a measured AP
            assert not [k for k in row if k.startswith('coco')], row
        if 'Paper box AP' in m['Metadata']:
            assert float(row['paper_box_ap']) == m['Metadata']['Paper box AP']
    assert rows['atss_r50_fpn_1x_coco']['architecture'] == 'atss,fpn,resnet'


# What users type after `mim search mmdet_dyhead --model`, and the config
# folder whose entries it must list. mim compares it with the lower-cased
# collection name (openmim 0.3.9, mim/commands/search.py filter_by_models).
FAMILIES = [
    ('atss', 'atss'),
    ('retinanet', 'retinanet'),
    ('fcos', 'fcos'),
    ('reppoints', 'reppoints'),
    ('faster-rcnn', 'faster_rcnn'),
    ('mask-rcnn', 'mask_rcnn'),
    ('cascade-rcnn', 'cascade_rcnn'),
    ('rtmdet', 'rtmdet'),
]


@pytest.mark.parametrize(
    'typed,folder', FAMILIES, ids=[f for f, _ in FAMILIES]
)
def test_mim_search_model_filter_finds_each_family(typed, folder, tmp_path):
    _, env = installed_package_dir(tmp_path)
    out = mim(['search', 'mmdet_dyhead', '--model', typed], env, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    listed = re.findall(r'^config id: (\S+)$', out.stdout, re.M)
    meta = yaml.safe_load(
        open(osp.join(REPO_ROOT, 'configs', folder, 'metafile.yml'))
    )
    assert sorted(listed) == sorted(m['Name'] for m in meta['Models'])


def test_mim_download_fetches_weights_and_config_and_hash_is_enforced(
    http_root, tmp_path, monkeypatch
):
    """``mim download`` reads the URL from the installed metafile. To serve it
    locally, the test puts an overlay copy of the installed package (its
    dist-info too, so mim's pkg_resources lookup lands there) first on
    PYTHONPATH, with only the ``Weights:`` host rewritten to the loopback
    server. mim itself runs unchanged."""
    pkg, env = installed_package_dir(tmp_path)
    www, base, seen = http_root
    overlay = tmp_path / 'overlay'
    shutil.copytree(
        pkg,
        overlay / 'mmdet_dyhead',
        ignore=shutil.ignore_patterns('__pycache__'),
    )
    for info in glob.glob(
        osp.join(osp.dirname(pkg), 'mmdet_dyhead-*.dist-info')
    ):
        shutil.copytree(info, overlay / osp.basename(info))
    host = 'https://download.openmmlab.com'
    for meta in glob.glob(
        str(overlay / 'mmdet_dyhead/.mim/configs/*/metafile.yml')
    ):
        text = open(meta).read()
        open(meta, 'w').write(text.replace(host, base))
    _, models = our_models()
    (entry,) = [
        m
        for m in models
        if m['Name'] == 'atss_r50-caffe_fpn_dyhead-6b_1x_coco'
    ]
    url_path = entry['Weights'][len(host) :]
    served = www / url_path.lstrip('/')
    served.parent.mkdir(parents=True)
    tiny_checkpoint(served)  # not the released file: its sha256 differs

    env = dict(env, PYTHONPATH=str(overlay))
    dest = tmp_path / 'dest'
    out = mim(
        [
            'download',
            'mmdet_dyhead',
            '--config',
            entry['Name'],
            '--dest',
            str(dest),
        ],
        env,
        tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert seen == [url_path]
    name = osp.basename(url_path)
    assert (dest / name).read_bytes() == served.read_bytes()
    dumped = (dest / f'{entry["Name"]}.py').read_text()
    assert "type='DyHeadNeck'" in dumped and "'mmdet_dyhead'" in dumped

    # Placed in torch's hub cache, the file is what dyhead://<name> uses
    # without downloading; it is not the published one, so it is refused.
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    cache = osp.join(default_cache_dir())
    os.makedirs(cache)
    shutil.copy(dest / name, cache)
    from mmengine.runner.checkpoint import CheckpointLoader

    with pytest.raises(
        CheckpointHashError, match=entry['Metadata']['Weights SHA256 Prefix']
    ):
        CheckpointLoader.load_checkpoint(f'dyhead://{entry["Name"]}')
    assert seen == [url_path]  # no second download


@pytest.mark.slow
def test_mim_train_then_mim_test_run_a_config_of_this_package(tmp_path):
    """`mim train mmdet_dyhead CFG` and `mim test mmdet_dyhead CFG
    --checkpoint ...` run the wheel's .mim/tools scripts (mmdet's, with the
    plugin imported) on a tiny ATSS+DyHead config; the test ends with
    CocoMetric's COCO summary."""
    from projects.synthetic_coco import (
        generate_synthetic_coco,
        tiny_detector_cfg,
    )

    _, env = installed_package_dir(tmp_path)
    data = generate_synthetic_coco(
        str(tmp_path / 'data'), num_train=2, num_val=2, image_size=64, seed=0
    )
    work = tmp_path / 'work'
    ITERS = 6
    cfg = tiny_detector_cfg(
        osp.join(REPO_ROOT, 'configs/atss/atss_r50_fpn_dyhead-6b_1x_coco.py'),
        data,
        str(work),
        iters=ITERS,
        checkpoint_interval=ITERS,
    )
    cfg.log_level = 'WARNING'
    cfg_file = tmp_path / 'tiny_atss_dyhead.py'
    cfg.dump(str(cfg_file))
    out = mim(
        ['train', 'mmdet_dyhead', str(cfg_file), '--work-dir', str(work)],
        env,
        tmp_path,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    ckpt_file = work / f'iter_{ITERS}.pth'
    assert ckpt_file.is_file(), (out.stdout + out.stderr)[-3000:]
    out = mim(
        [
            'test',
            'mmdet_dyhead',
            str(cfg_file),
            '--checkpoint',
            str(ckpt_file),
            '--work-dir',
            str(work),
        ],
        env,
        tmp_path,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    # pycocotools' summary, printed by mmdet's CocoMetric (the config keeps
    # log_level WARNING, so the logger's metric line is not shown).
    assert re.search(
        r'Average Precision +\(AP\) @\[ IoU=0\.50:0\.95 \| area= +all', log
    ), log[-3000:]
