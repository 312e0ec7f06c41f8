"""Checked checkpoint files: the ``dyhead://`` scheme and clear load errors.

What torch and mmengine already do is used as it is: torch.hub downloads
(to a ``.partial`` file, with its sha256-prefix check) and ``torch.load``'s
``weights_only`` unpickler. This module adds what they do not:

- ``dyhead://<model name>`` in mmengine's ``CheckpointLoader`` (registered
  on import; a new prefix, no existing scheme changes): the name is looked up
  in the package's model index, which gives the URL and the sha256 prefix.
  The file is downloaded into torch.hub's cache only once complete and
  verified, re-checked when taken from the cache, and loaded weights-only::

      load_from = 'dyhead://atss_r50_fpn_dyhead-6b_1x_coco'

- :func:`load_weights_only`: a weights-only load whose errors say what the
  file is (an HTML page, a git-LFS pointer, JSON, a numpy array, a
  truncated archive) and name a refused code-running payload.
"""

import hashlib
import os
import os.path as osp
import pickle
import re
import tempfile
import zipfile
from typing import Dict, Optional, Tuple
from urllib.parse import urlparse

import torch
from mmengine.runner.checkpoint import CheckpointLoader

SCHEME = 'dyhead://'

# Names whose import by an unpickler means the file runs code when loaded.
CODE_RUNNING = re.compile(
    r'^(os|posix|nt|subprocess|sys|shutil|socket|runpy|importlib|pty|'
    r'webbrowser|code|marshal|pickle|ctypes)\.|'
    r'^builtins\.(eval|exec|compile|__import__|open|getattr|setattr|'
    r'globals|locals|vars|input|breakpoint)$'
)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used as it is."""


class CheckpointHashError(CheckpointError):
    """A downloaded file whose sha256 differs from the published one."""


def sha256_of(path: str, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file.

    Args:
        path (str): The file.
        chunk_size (int): Bytes read at a time.
    """
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(chunk_size), b''):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------
# what a file is
# ----------------------------------------------------------------------------
def describe_non_checkpoint(path: str) -> Optional[str]:
    """Why ``path`` cannot be a torch checkpoint, or None if it may be one.

    torch writes a zip archive holding ``<name>/data.pkl`` (torch >= 1.6) or
    a protocol-2 pickle (legacy format); anything else is named.

    Args:
        path (str): A local file.
    """
    with open(path, 'rb') as f:
        head = f.read(512)
    if not head:
        return 'it is empty'
    if head.startswith(b'PK\x03\x04'):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return (
                'it is a truncated or corrupt zip archive (an '
                'interrupted download or copy)'
            )
        if any(n.endswith('data.pkl') for n in names):
            return None
        return (
            f'it is a zip archive without data.pkl, not a torch '
            f'checkpoint (entries: {names[:5]})'
        )
    if head.startswith(b'\x80\x02'):  # torch.save's legacy format
        return None
    if head[:1] == b'\x80' and 3 <= head[1] <= 5:
        return (
            f'it is a plain Python pickle (protocol {head[1]}), not a '
            f'file written by torch.save; unpickling it could run code, '
            f'so it is not loaded'
        )
    if head.startswith(b'\x93NUMPY'):
        return 'it is a numpy .npy array (load it with numpy.load)'
    if head.startswith(b'\x89HDF'):
        return 'it is an HDF5 file (Keras/h5py weights)'
    if head.startswith(b'\x1f\x8b'):
        return 'it is gzip-compressed (decompress it first)'
    text = head.decode('utf-8', errors='replace').lstrip('\ufeff').lstrip()
    lowered = text.lower()
    if lowered.startswith('version https://git-lfs'):
        return (
            'it is a git-LFS pointer file, not the weights (run '
            '`git lfs pull` in its repository, or download the file '
            'itself)'
        )
    if lowered.startswith(('<!doctype', '<html', '<?xml', '<head', '<body')):
        return (
            'it is an HTML/XML page (a login, error or redirect page '
            'saved instead of the file)'
        )
    if text.startswith(('{', '[')):
        return 'it is JSON text'
    first_line = text.splitlines()[0][:60] if text else ''
    return f'it is a text or unknown file starting with {first_line!r}'


def _refused_global(err: Exception) -> Optional[str]:
    found = re.search(r'GLOBAL ([\w.]+)', str(err))
    return found.group(1) if found else None


def load_weights_only(path: str, map_location=None) -> object:
    """``torch.load(path, weights_only=True)`` with errors that name the fix.

    Args:
        path (str): A local checkpoint file.
        map_location: As in :func:`torch.load`.

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: The file is not a torch checkpoint, is truncated,
            or holds Python objects the weights-only unpickler refuses.
    """
    path = osp.expanduser(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'Checkpoint {path} does not exist.')
    problem = describe_non_checkpoint(path)
    if problem:
        raise CheckpointError(
            f'{path} is not a torch checkpoint: {problem}. Fix: check the '
            f'path, or download or copy the file again.'
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        name = _refused_global(err)
        if name and CODE_RUNNING.search(name):
            raise CheckpointError(
                f'Refused {path}: loading it would call {name}, which runs '
                f'commands or code. It is not a checkpoint but a payload; do '
                f'not load it with weights_only=False. Delete it unless you '
                f'know why it is there.'
            ) from err
        if name:
            raise CheckpointError(
                f'Checkpoint {path} holds a {name} object, which a '
                f'weights-only load does not unpickle. Fix: if the file comes '
                f'from a source you trust, convert it once to a plain '
                f"{{'state_dict': tensors}} file (official DyHead files: "
                f'tools/convert_official_dyhead.py); mmengine checkpoints '
                f'load through the package tools, see '
                f'docs/model_zoo.md.'
            ) from err
        raise CheckpointError(
            f'Cannot unpickle {path}: {str(err).splitlines()[0]}. The file '
            f'is truncated or corrupt. Fix: download or copy it '
            f'again.'
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f'Cannot read checkpoint {path}: {str(err).splitlines()[0]}. The '
            f'file is truncated or corrupt. Fix: download or copy it '
            f'again.'
        ) from err


# ----------------------------------------------------------------------------
# downloads
# ----------------------------------------------------------------------------
def default_cache_dir() -> str:
    """torch.hub's checkpoint cache (``$TORCH_HOME/hub/checkpoints``), the
    directory mmengine's own http loader uses, so caches are shared."""
    return osp.join(torch.hub.get_dir(), 'checkpoints')


def check_cached_file(path: str, url: str, sha256: Optional[str]) -> None:
    """Check a file in the cache as ``dyhead://`` does before using it.

    Args:
        path (str): The cached file.
        url (str): Where it was published (for the message).
        sha256 (str, optional): Expected hex prefix of its sha256.

    Raises:
        CheckpointHashError: Its sha256 does not start with ``sha256``.
        CheckpointError: It is not a torch checkpoint.
    """
    if sha256:
        digest = sha256_of(path)
        if not digest.startswith(sha256.lower()):
            raise CheckpointHashError(
                f'The cached copy of {url} at {path} has sha256 '
                f'{digest[: len(sha256)]}..., but the file is published with '
                f'{sha256}... It is truncated or was replaced. Fix: delete '
                f'{path} (a cached download) and run again.'
            )
    problem = describe_non_checkpoint(path)
    if problem:
        raise CheckpointError(
            f'The cached copy of {url} at {path} is not a torch checkpoint: '
            f'{problem}. Fix: delete {path} (a cached download) and run '
            f'again.'
        )


def download_checkpoint(
    url: str,
    sha256: Optional[str] = None,
    cache_dir: Optional[str] = None,
    progress: bool = False,
) -> str:
    """Download ``url`` into ``cache_dir`` once; only a complete, verified
    torch checkpoint reaches the cached name.

    The download goes to a temporary file (torch.hub's
    ``download_url_to_file``, which also checks the sha256 prefix); the
    file must then look like a torch checkpoint, and only then is it
    renamed to ``cache_dir/<file name>``. A file already there is checked
    the same way before it is used.

    Args:
        url (str): http(s) URL.
        sha256 (str, optional): Expected hex prefix of the file's sha256.
        cache_dir (str, optional): Default torch.hub's checkpoint cache.
        progress (bool): Show a progress bar.

    Returns:
        str: The local path.
    """
    cache_dir = cache_dir or default_cache_dir()
    name = osp.basename(urlparse(url).path)
    if not name:
        raise CheckpointError(f'{url} does not end in a file name.')
    path = osp.join(cache_dir, name)
    if osp.isfile(path):
        check_cached_file(path, url, sha256)
        return path
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f'.{name}.', suffix='.part', dir=cache_dir
    )
    os.close(fd)
    try:
        try:
            torch.hub.download_url_to_file(
                url, tmp, hash_prefix=sha256, progress=progress
            )
        except RuntimeError as err:
            if 'invalid hash value' not in str(err):
                raise
            raise CheckpointHashError(
                f'Refused the download of {url}: its sha256 does not start '
                f'with the published {sha256} ({err}). The server sent '
                f'another file or the transfer was damaged; nothing was '
                f'cached. Fix: run again; if it persists, the published file '
                f'changed: report it.'
            ) from err
        except OSError as err:
            raise CheckpointError(
                f'Could not download {url}: {err}. Fix: check the network, '
                f'or fetch the file by other means and put it at {path} (it '
                f'is checked there before use).'
            ) from err
        problem = describe_non_checkpoint(tmp)
        if problem:
            raise CheckpointError(
                f'The download of {url} is not a torch checkpoint: {problem}. '
                f'Nothing was cached. Fix: check the URL (and whether it '
                f'needs a login).'
            )
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)
    return path


# ----------------------------------------------------------------------------
# the dyhead:// scheme
# ----------------------------------------------------------------------------
def _mim_root() -> str:
    """Where model-index.yml lives: the wheel's .mim/ or the repository."""
    package = osp.dirname(osp.dirname(osp.abspath(__file__)))
    shipped = osp.join(package, '.mim')
    if osp.isfile(osp.join(shipped, 'model-index.yml')):
        return shipped
    return osp.dirname(package)


def zoo_weights() -> Dict[str, Tuple[str, str]]:
    """``{model name: (weights URL, sha256 prefix)}`` from the model index,
    for every zoo entry that has weights."""
    import yaml

    root = _mim_root()
    with open(osp.join(root, 'model-index.yml')) as f:
        index = yaml.safe_load(f)
    entries = {}
    for metafile in index.get('Import', []):
        with open(osp.join(root, metafile)) as f:
            meta = yaml.safe_load(f) or {}
        for model in meta.get('Models', []):
            url = model.get('Weights')
            if url:
                sha = str(
                    model.get('Metadata', {}).get('Weights SHA256 Prefix', '')
                )
                entries[model['Name']] = (url, sha)
    return entries


def resolve_zoo_name(filename: str) -> Tuple[str, str]:
    """``dyhead://<name>`` -> ``(url, sha256 prefix)``.

    Raises:
        CheckpointError: Unknown name, or an entry without a hash.
    """
    name = filename[len(SCHEME) :] if filename.startswith(SCHEME) else filename
    zoo = zoo_weights()
    if name not in zoo:
        raise CheckpointError(
            f'{SCHEME}{name} is not in the model zoo. Models with weights: '
            f'{sorted(zoo)} (see docs/model_zoo.md).'
        )
    url, sha = zoo[name]
    if not sha:
        raise CheckpointError(
            f'{SCHEME}{name} has no published sha256 in '
            f'its metafile; refusing an unchecked file.'
        )
    return url, sha


def zoo_cache_path(name: str, cache_dir: Optional[str] = None) -> str:
    """Where the weights of zoo model ``name`` belong on this machine.

    That is ``cache_dir/<file name of the weights URL>``: the file
    ``dyhead://<name>`` checks and then reads instead of downloading
    (mmengine's loader for the URL itself reads it too, unchecked).

    Args:
        name (str): A model name of the zoo, or ``dyhead://<name>``.
        cache_dir (str, optional): Default torch.hub's checkpoint cache.

    Raises:
        CheckpointError: ``name`` has no weights in the zoo.
    """
    url, _ = resolve_zoo_name(name)
    return osp.join(
        cache_dir or default_cache_dir(), osp.basename(urlparse(url).path)
    )


def load_from_dyhead(
    filename: str, map_location=None, model_dir: Optional[str] = None
) -> object:
    """mmengine scheme loader for ``dyhead://<model name>``.

    In distributed runs rank 0 downloads first; the others then read the
    verified cache.

    Args:
        filename (str): ``dyhead://<model name>``.
        map_location: As in :func:`torch.load`.
        model_dir (str, optional): Cache directory (default torch.hub's).
    """
    from mmengine.dist import get_dist_info

    url, sha = resolve_zoo_name(filename)
    rank, world_size = get_dist_info()
    if rank == 0:
        path = download_checkpoint(url, sha, model_dir, progress=True)
    if world_size > 1:
        torch.distributed.barrier()
        if rank > 0:
            path = download_checkpoint(url, sha, model_dir)
    return load_weights_only(path, map_location)


CheckpointLoader.register_scheme(SCHEME, load_from_dyhead)
