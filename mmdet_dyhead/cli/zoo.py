"""Zoo weights on this machine: list, fetch, or place a file got elsewhere.

    python tools/zoo.py list                   # models, URLs, cache state
    python tools/zoo.py fetch NAME [NAME ...]  # download, checked
    python tools/zoo.py place NAME FILE        # a file got by other means

The weights of a zoo model belong in torch.hub's cache
(``$TORCH_HOME/hub/checkpoints/<file name of its URL>``), where
``load_from = 'dyhead://NAME'`` finds them, checks their sha256 against the
prefix published in the metafile and loads them without a download. ``fetch``
downloads into that place through a temporary file that only gets its name
once checked; ``place`` copies a file obtained by other means there, and
refuses one whose sha256 is not the published one. Offline machines: run
``fetch`` (or download the URL that ``list`` shows) on a machine with
network, copy the file over, then ``place`` it.
"""

import argparse
import os
import shutil
import sys
import tempfile

from mmdet_dyhead.checkpoint import files, zoo
from mmdet_dyhead.cli._paths import repo_root

# The command the messages suggest: in a checkout the script next to the
# configs; an installed package has no tools/ folder to run, but it has the
# console script.
TOOL = 'python tools/zoo.py' if repo_root() else 'dyhead-zoo'


def _status(path: str, url: str, sha: str) -> str:
    if not os.path.isfile(path):
        return 'missing'
    try:
        files.check_cached_file(path, url, sha)
    except files.CheckpointError as err:
        return f'INVALID: {err}'
    return 'ok (sha256 matches)'


def list_models() -> int:
    """Print every zoo model with weights and the state of its cached file."""
    models = zoo.zoo_weights()
    print(
        f'{len(models)} zoo models with weights; cache folder: '
        f'{files.default_cache_dir()} (set TORCH_HOME to move it)'
    )
    for name in sorted(models):
        url, sha = models[name]
        path = zoo.zoo_cache_path(name)
        print(f'\n{name}')
        print(f'  url     {url}')
        print(f'  sha256  {sha}...')
        print(f'  file    {path}')
        print(f'  status  {_status(path, url, sha)}')
    print(
        f"\nUse one in a config with load_from = 'dyhead://<name>'. Missing "
        f'files: `{TOOL} fetch <name>`, or offline: download the url '
        f'elsewhere and `{TOOL} place <name> <file>`.'
    )
    return 0


def fetch(names) -> int:
    """Download the weights of ``names`` into the cache, checked."""
    failed = 0
    for name in names:
        try:
            url, sha = zoo.resolve_zoo_name(name)
        except files.CheckpointError as err:
            print(f'error: {err}', file=sys.stderr)
            failed += 1
            continue
        try:
            path = files.download_checkpoint(url, sha, progress=True)
        except files.CheckpointError as err:
            print(
                f'error: {err}\nOffline, or the download keeps failing? Get '
                f'{url} by other means (a browser, another machine), then '
                f'run `{TOOL} place {name} <file>`; it checks the file and '
                f'puts it where dyhead://{name} looks.',
                file=sys.stderr,
            )
            failed += 1
            continue
        print(f'{name}: {path} (sha256 starts with {sha})')
    return 1 if failed else 0


def place(name: str, source: str) -> int:
    """Copy ``source`` into the cache as the weights of ``name`` after
    checking that it is the published file."""
    try:
        url, sha = zoo.resolve_zoo_name(name)
    except files.CheckpointError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    path = zoo.zoo_cache_path(name)
    if not os.path.isfile(source):
        print(f'error: {source} is not a file.', file=sys.stderr)
        return 1
    digest = files.sha256_of(source)
    if not digest.startswith(sha.lower()):
        problem = files.describe_non_checkpoint(source)
        print(
            f'error: refused {source}: its sha256 starts with '
            f'{digest[: len(sha)]}, but {name} is published with {sha} '
            f'({os.path.basename(path)}). It is '
            + (
                f'not a checkpoint at all: {problem}'
                if problem
                else 'another checkpoint, or a truncated or damaged copy'
            )
            + f'. Nothing was placed. Fix: download {url} again (a '
            f'complete download) and place that file.',
            file=sys.stderr,
        )
        return 1
    problem = files.describe_non_checkpoint(source)
    if problem:  # only if the published file itself were not a checkpoint
        print(
            f'error: refused {source}: {problem}. Nothing was placed.',
            file=sys.stderr,
        )
        return 1
    if os.path.isfile(path) and os.path.samefile(source, path):
        print(f'{name}: {path} is already in place (sha256 matches)')
        return 0
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f'.{os.path.basename(path)}.', suffix='.part', dir=folder
    )
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        # checked again where it lies, as dyhead:// will check it
        files.check_cached_file(tmp, url, sha)
        replaced = os.path.isfile(path)
        os.replace(tmp, path)
    except (OSError, files.CheckpointError) as err:
        print(
            f'error: could not place {source} at {path}: {err}. Nothing '
            f'was placed.',
            file=sys.stderr,
        )
        return 1
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(
        f'{name}: {"replaced" if replaced else "placed"} {path} (sha256 '
        f"starts with {sha}); load_from = 'dyhead://{name}' now loads it "
        f'without a download.'
    )
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        epilog='Details: docs/model_zoo.md of the source repository, '
        '"Offline machines and failed downloads".',
    )
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    sub.required = True
    sub.add_parser(
        'list',
        help='zoo models with weights: URL, sha256 prefix, where the file '
        'belongs in the cache, and whether it is there and valid',
    )
    p = sub.add_parser(
        'fetch',
        help='download the weights of zoo models into the cache (checked '
        'against the published sha256 before they get their name)',
    )
    p.add_argument('names', nargs='+', metavar='NAME', help='zoo model name')
    p = sub.add_parser(
        'place',
        help='copy a file obtained by other means (browser, another '
        'machine) into the cache as the weights of NAME, after checking '
        'its sha256',
    )
    p.add_argument('name', metavar='NAME', help='zoo model name')
    p.add_argument('file', metavar='FILE', help='the downloaded weights')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == 'list':
        return list_models()
    if args.command == 'fetch':
        return fetch(args.names)
    return place(args.name, args.file)


if __name__ == '__main__':
    sys.exit(main())
