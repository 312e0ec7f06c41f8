"""Reading one checkpoint file: weights only, with a diagnosis that names
the file and the fix; downloads through torch.hub into its cache.

Every file is read with ``torch.load(..., weights_only=True)`` passed
explicitly, inside the allow-list of mmengine's training-checkpoint classes
(:mod:`.allowlist`). torch >= 2.6 lets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
turn the check off only where a caller leaves ``weights_only`` unset, so the
environment cannot turn it off here.
"""

import hashlib
import os
import os.path as osp
import pickle
import re
import tempfile
import zipfile
from typing import List, Optional

import torch

from .allowlist import mmengine_safe_globals

# Globals whose call runs commands or arbitrary code.
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
                'interrupted download, copy or save)'
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


def _refused_globals(path: str, err: Exception) -> List[str]:
    """The globals a weights-only load refuses in ``path`` (all of them for
    zip checkpoints, else the one named in ``err``)."""
    lister = getattr(
        torch.serialization, 'get_unsafe_globals_in_checkpoint', None
    )
    if lister is not None and zipfile.is_zipfile(path):
        try:
            with mmengine_safe_globals():
                found = sorted(lister(path))
            if found:
                return found
        except (ValueError, RuntimeError, pickle.UnpicklingError):
            pass
    named = re.search(r'GLOBAL ([\w.]+)', str(err))
    return [named.group(1)] if named else []


def _unpickling_error(path: str, err: Exception) -> CheckpointError:
    names = _refused_globals(path, err)
    running = [n for n in names if CODE_RUNNING.search(n)]
    if running:
        return CheckpointError(
            f'Refused {path}: loading it would call {", ".join(running)}, '
            f'which runs commands or code. It is not a checkpoint but a '
            f'payload; do not load it with weights_only=False. Delete it '
            f'unless you know why it is there.'
        )
    if names:
        return CheckpointError(
            f'Refused {path}: its pickle names {", ".join(names)}, beyond '
            f"tensors, containers and mmengine's checkpoint classes. A "
            f'pickle calls what it names while it loads, so such a file can '
            f'run code; a weights-only load does not import it (and nothing '
            f'in this package loads it any other way). Fix: if the file is '
            f'your own, '
            f're-save its weights alone where it was made, '
            f"torch.save({{'state_dict': model.state_dict()}}, path) "
            f'(official DyHead files: tools/convert_official_dyhead.py); '
            f'otherwise delete it.'
        )
    return CheckpointError(
        f'Cannot unpickle {path}: {str(err).splitlines()[0]}. The file is '
        f'truncated or corrupt. Fix: download or copy it again.'
    )


def read_file(path: str, map_location=None) -> object:
    """Read a local checkpoint weights-only, mmengine's own files included.

    Args:
        path (str): A local checkpoint file.
        map_location: As in :func:`torch.load`.

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: The file is not a torch checkpoint, is truncated,
            or names Python objects the weights-only unpickler refuses.
    """
    path = osp.expanduser(path)
    if not osp.isfile(path):
        raise FileNotFoundError(
            f'Checkpoint {path} does not exist. Fix: check the path.'
        )
    problem = describe_non_checkpoint(path)
    if problem:
        raise CheckpointError(
            f'{path} is not a torch checkpoint: {problem}. Fix: check the '
            f'path, or download or copy the file again.'
        )
    try:
        with mmengine_safe_globals():
            return torch.load(
                path, map_location=map_location, weights_only=True
            )
    except pickle.UnpicklingError as err:
        raise _unpickling_error(path, err) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f'Cannot read checkpoint {path}: {str(err).splitlines()[0]}. The '
            f'file is truncated or corrupt. Fix: download or copy it '
            f'again.'
        ) from err


def default_cache_dir() -> str:
    """torch.hub's checkpoint cache (``$TORCH_HOME/hub/checkpoints``), the
    directory mmengine's own http loader uses, so caches are shared."""
    return osp.join(torch.hub.get_dir(), 'checkpoints')


def check_cached_file(path: str, url: str, sha256: Optional[str]) -> None:
    """Check a file in the cache before using it.

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
    """Download ``url`` into ``cache_dir`` once; only a complete, checked
    torch checkpoint reaches the cached name.

    torch.hub's ``download_url_to_file`` writes a temporary file (and checks
    the sha256 prefix); the file must then look like a torch checkpoint, and
    only then is it renamed to ``cache_dir/<file name>``. A failed download
    leaves nothing. A file already there is checked the same way before it
    is used.

    Args:
        url (str): http(s) URL.
        sha256 (str, optional): Expected hex prefix of the file's sha256.
        cache_dir (str, optional): Default torch.hub's checkpoint cache.
        progress (bool): Show a progress bar.

    Returns:
        str: The local path.
    """
    cache_dir = cache_dir or default_cache_dir()
    name = osp.basename(url.split('?', 1)[0].split('#', 1)[0])
    if not name:
        raise CheckpointError(
            f'{url} does not end in a file name. Fix: give the URL of the '
            f'checkpoint file itself.'
        )
    path = osp.join(cache_dir, name)
    if osp.isfile(path):
        check_cached_file(path, url, sha256)
        return path
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f'.{name}.', suffix='.partial', dir=cache_dir
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


def fetch(url: str, sha256: Optional[str] = None) -> str:
    """:func:`download_checkpoint` for every rank of a distributed run:
    rank 0 downloads, the others then take the checked cached file."""
    from mmengine.dist import get_dist_info

    rank, world_size = get_dist_info()
    if rank == 0:
        path = download_checkpoint(url, sha256, progress=os.isatty(2))
    if world_size > 1:
        torch.distributed.barrier()
        if rank > 0:
            path = download_checkpoint(url, sha256)
    return path
