"""Reading one checkpoint file: weights only, with a diagnosis that names
the file and the fix; downloads, with a read timeout, into torch.hub's
cache.

Every file is read with ``torch.load(..., weights_only=True)`` passed
explicitly, inside the allow-list of mmengine's training-checkpoint classes
(:mod:`.allowlist`). torch >= 2.6 lets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
turn the check off only where a caller leaves ``weights_only`` unset, so the
environment cannot turn it off here.

torch does not check the CRC-32 that its zip format stores for every
member, so a flipped bit in tensor data loads silently; :func:`read_file`
checks it first (one extra read of the file, about 1.3-2.2 ms per MB on a
2-core machine). Files in torch's legacy (non-zip) format hold no checksum
and are read with a warning that says so.
"""

import contextlib
import hashlib
import http.client
import os
import os.path as osp
import pickle
import re
import socket
import sys
import tempfile
import time
import urllib.request
import warnings
import zipfile
from typing import Iterator, List, Optional

try:  # POSIX: locks tell a live download from a killed one
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

import torch

from . import legacy
from .allowlist import RefusedCall, finish_load, mmengine_safe_globals

# Modules whose members, called by a pickle, run commands or code or touch
# files, processes and the network.
CODE_MODULES = frozenset(
    'os posix nt subprocess sys shutil socket runpy importlib pty '
    'webbrowser code codeop marshal pickle _pickle ctypes timeit '
    'multiprocessing asyncio threading _thread signal pdb profile cProfile '
    'trace tempfile pathlib io _io'.split()
)
# builtins that evaluate code, import, or reach any attribute or file.
CODE_BUILTINS = frozenset(
    'eval exec compile __import__ open getattr setattr delattr globals '
    'locals vars input breakpoint'.split()
)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used as it is."""


class CheckpointHashError(CheckpointError):
    """A downloaded file whose sha256 differs from the published one."""


class CheckpointCorruptError(CheckpointError):
    """A zip checkpoint with a member whose bytes fail their CRC-32."""


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


def _resolve(name: str) -> Optional[object]:
    """The object ``module.qualname`` names, if its module is already
    imported (importing a module a file names could itself run code)."""
    parts = name.split('.')
    for cut in range(len(parts) - 1, 0, -1):
        module = sys.modules.get('.'.join(parts[:cut]))
        if module is None:
            continue
        obj = module
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return None
        return obj
    return None


def global_kind(name: str) -> str:
    """What a global named in a pickle is: ``'code'`` (runs commands or
    code: ``os.system``, ``eval``, ``timeit.timeit``, ...), ``'call'``
    (another function: the pickle calls it while loading) or ``'data'`` (a
    class, or a name whose module is not imported here).

    Args:
        name (str): ``module.qualname`` as the unpickler reports it.
    """
    module, _, attr = name.partition('.')
    if module in CODE_MODULES or (
        module == 'builtins' and attr in CODE_BUILTINS
    ):
        return 'code'
    obj = _resolve(name)
    if obj is not None and callable(obj) and not isinstance(obj, type):
        return 'call'
    return 'data'


def _unpickling_error(path: str, err: Exception) -> CheckpointError:
    names = _refused_globals(path, err)
    kinds = {name: global_kind(name) for name in names}
    calls = sorted(names, key=lambda n: kinds[n] != 'code')
    calls = [n for n in calls if kinds[n] != 'data']
    if calls:
        code = [n for n in calls if kinds[n] == 'code']
        why = (
            f'{", ".join(code)} runs commands or code'
            if code
            else 'a function, not data'
        )
        return CheckpointError(
            f'Refused {path}: it tries to call {", ".join(calls)} when '
            f'loaded ({why}). A checkpoint holds tensors and plain data, so '
            f'this file should not be trusted: it is a payload, not a '
            f'checkpoint; do not load it with weights_only=False. Delete it '
            f'unless you know why it is there.'
        )
    if names:
        return CheckpointError(
            f'Refused {path}: its pickle names {", ".join(names)}: data '
            f'classes (or names from modules not imported here) beyond '
            f"tensors, containers and mmengine's checkpoint classes. "
            f'A pickle builds what it names while it loads, so a weights-only '
            f'load does not import it (and nothing in this package loads it '
            f'any other way). Fix: if the file is your own, re-save its '
            f'weights alone where it was made, '
            f"torch.save({{'state_dict': model.state_dict()}}, path) "
            f'(official DyHead files: tools/convert_official_dyhead.py); '
            f'otherwise delete it.'
        )
    message = _first_line(err)
    if message.startswith('Unsupported operand'):
        return CheckpointError(
            f'Cannot unpickle {path}: {message}. The file is truncated or '
            f'corrupt. Fix: download or copy it again.'
        )
    return _refused_call_error(
        path, 'a pickle instruction', f'the weights-only unpickler: {message}'
    )


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _refused_call_error(path: str, name: str, reason: str) -> CheckpointError:
    return CheckpointError(
        f'Refused {path}: refused global {name}: {reason}. torch.save never '
        f'writes this, so the file is damaged or was made to look like a '
        f'checkpoint, and no option of this package loads it. Fix: get the '
        f'file again from where it was made, or delete it.'
    )


def _failed_call(err: BaseException) -> Optional[str]:
    """What the weights-only unpickler was calling when ``err`` was raised:
    ``module.qualname`` of an allow-listed function or class,
    ``'storage'`` when it was reading tensor data, None when the error was
    not raised while unpickling (e.g. by the zip reader)."""
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    loads = [
        i
        for i, frame in enumerate(frames)
        if frame.f_code.co_name == 'load'
        and frame.f_code.co_filename.endswith('_weights_only_unpickler.py')
    ]
    if not loads:
        return None
    if loads[-1] + 1 < len(frames):  # a Python function was called
        frame = frames[loads[-1] + 1]
        module = frame.f_globals.get('__name__', '?')
        if module == 'torch.serialization':  # persistent_load: tensor data
            return 'storage'
        qualname = getattr(frame.f_code, 'co_qualname', frame.f_code.co_name)
        return f'{module}.{qualname}'
    # a C function or class: what the unpickler's frame was applying
    state = frames[loads[-1]].f_locals
    key = state.get('key')
    if key == pickle.BINPERSID:
        return 'storage'
    if key == pickle.BUILD:
        return _qualified(type(state.get('inst'))) + '.__setstate__'
    target = state.get('func' if key == pickle.REDUCE else 'cls')
    return _qualified(target) if target is not None else 'a call'


def _qualified(obj) -> str:
    module = getattr(obj, '__module__', None)
    name = getattr(obj, '__qualname__', None) or repr(obj)
    return f'{module}.{name}' if module else name


def load_error(path: str, err: Exception) -> CheckpointError:
    """The package's diagnosis of an exception ``torch.load`` raised for
    ``path`` (weights-only, inside :func:`mmengine_safe_globals`): the file
    and the real reason, never torch's advice to turn the check off.

    Args:
        path (str): The checkpoint file.
        err (Exception): What ``torch.load`` raised.
    """
    root = err
    # torch re-raises an unpickling error with its advice, ``from None``;
    # the error the unpickler raised is still its context
    if isinstance(err, pickle.UnpicklingError) and err.__context__:
        root = err.__context__
    if isinstance(root, RefusedCall):
        return _refused_call_error(path, root.name, root.reason)
    if isinstance(root, pickle.UnpicklingError):
        return _unpickling_error(path, root)
    called = _failed_call(root)
    reason = f'{type(root).__name__}: {_first_line(root)}'
    if called == 'storage':
        return CheckpointError(
            f'Cannot read checkpoint {path}: its tensor data does not match '
            f'what its pickle describes ({reason}). The file is truncated, '
            f'damaged or crafted. Fix: download or copy it again.'
        )
    if called:
        return _refused_call_error(
            path,
            called,
            f'the pickle calls it with arguments it cannot use ({reason})',
        )
    return CheckpointError(
        f'Cannot read checkpoint {path}: {reason}. The file is truncated or '
        f'corrupt. Fix: download or copy it again.'
    )


def corrupt_member(path: str) -> Optional[str]:
    """The first member of zip checkpoint ``path`` whose bytes fail the
    CRC-32 stored for it, or None when all match.

    torch.load never compares them, so this is the only check that sees a
    flipped bit inside tensor data. It reads the whole file once.

    Args:
        path (str): A zip checkpoint (torch >= 1.6 format).
    """
    with zipfile.ZipFile(path) as archive:
        try:
            return archive.testzip()
        except (EOFError, OSError) as err:  # a member cut short
            return f'? ({err})'


def corrupt_message(path: str, member: str) -> str:
    """Why ``path`` is refused, and what to do, for a failed CRC check."""
    return (
        f'{path} is corrupt: its member {member} fails the CRC-32 check '
        f'stored in the file (torch.load does not make it), so its bytes '
        f'changed after torch wrote them (a damaged disk, copy or '
        f'download). Fix: download or copy it again (a cached download: '
        f'delete it and run again); for a training checkpoint, use the '
        f'previous one of its work_dir.'
    )


def _check_legacy_storages(path: str, size: int) -> None:
    """Refuse a legacy-format file whose pickle asks for more storage bytes
    than the file holds (torch allocates them before reading the data)."""
    try:
        need = legacy.storage_bytes(path)
    except (ValueError, EOFError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f'Cannot read checkpoint {path}: its pickle is cut short or '
            f'garbled ({err}). The file is truncated or corrupt. Fix: '
            f'download or copy it again.'
        ) from err
    if need is None or need > size:
        what = (
            'a storage whose size is not a number'
            if need is None
            else f'{need} bytes of tensor storage, more than the whole file '
            f'({size} bytes)'
        )
        raise CheckpointError(
            f'Refused {path}: its pickle asks for {what}; torch would '
            f'allocate that before reading the data. torch.save never writes '
            f'this, so the file is damaged or was made to look like a '
            f'checkpoint. Fix: get the file again from where it was made, or '
            f'delete it.'
        )


def read_file(path: str, map_location=None) -> object:
    """Read a local checkpoint weights-only, mmengine's own files included.

    Args:
        path (str): A local checkpoint file.
        map_location: As in :func:`torch.load`.

    Raises:
        FileNotFoundError: No such file.
        CheckpointCorruptError: A member fails its CRC-32 check.
        CheckpointError: The file is not a torch checkpoint, is truncated,
            names Python objects the weights-only unpickler refuses, or
            calls allow-listed ones with arguments they refuse (a shape
            larger than the file, a tensor view larger than the file, a
            HistoryBuffer whose histories differ in length).
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
    if zipfile.is_zipfile(path):
        member = corrupt_member(path)
        if member:
            raise CheckpointCorruptError(corrupt_message(path, member))
    else:
        warnings.warn(
            f"{path} is in torch's legacy (non-zip) format, which stores no "
            f'checksums: whether its bytes are intact cannot be checked. '
            f'Re-saving it with torch.save gives a file that can be.',
            stacklevel=2,
        )
    size = os.path.getsize(path)
    if not zipfile.is_zipfile(path):
        _check_legacy_storages(path, size)
    try:
        with mmengine_safe_globals(max_bytes=size):
            checkpoint = torch.load(
                path, map_location=map_location, weights_only=True
            )
        return finish_load(checkpoint, max_bytes=size)
    except Exception as err:  # every failure gets the file and the reason
        raise load_error(path, err) from err


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


# A download in progress: '.<name>.<8 random chars>.partial', created by
# mkstemp and locked (flock) by its process until the download ends; the
# data goes to '<that>.data'. A kill (SIGKILL, SIGTERM, power loss)
# leaves them behind with the lock released, which is how the next download
# tells them from another process's live one.
PARTIAL_LOCK = re.compile(r'^\..+\.[a-z0-9_]{8}\.partial$')


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock of ``fd`` without waiting; False if another
    process holds it (or locks are not available: then nothing counts as
    abandoned)."""
    if fcntl is None:  # pragma: no cover
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _remove_download_files(cache_dir: str, lock: str) -> None:
    """Remove what the download of lock file ``lock`` wrote, then the lock
    itself (the caller holds its lock)."""
    for entry in os.listdir(cache_dir):
        if entry.startswith(lock + '.'):
            with contextlib.suppress(FileNotFoundError):
                os.remove(osp.join(cache_dir, entry))
    with contextlib.suppress(FileNotFoundError):
        os.remove(osp.join(cache_dir, lock))


def remove_abandoned_downloads(cache_dir: str) -> List[str]:
    """Remove the partial files of downloads into ``cache_dir`` whose
    process was killed; a download that another process is still running
    (its lock held) is left alone.

    Args:
        cache_dir (str): A download cache folder.

    Returns:
        list[str]: The lock files of the removed downloads.
    """
    if not osp.isdir(cache_dir):
        return []
    removed = []
    for entry in sorted(os.listdir(cache_dir)):
        if not PARTIAL_LOCK.match(entry):
            continue
        lock = osp.join(cache_dir, entry)
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:  # its download just ended
            continue
        try:
            # The name must still be this inode: a download that ended
            # between open and lock has released a file already unlinked.
            if _try_lock(fd) and os.fstat(fd).st_ino == _inode(lock):
                _remove_download_files(cache_dir, entry)
                removed.append(lock)
        finally:
            os.close(fd)
    return removed


def _inode(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _download_target(cache_dir: str, name: str) -> Iterator[str]:
    """A temporary file to download ``name`` into, locked for this process
    while the block runs; whatever the download wrote is removed when the
    block ends, by an error or a KeyboardInterrupt too."""
    while True:
        fd, lock = tempfile.mkstemp(
            prefix=f'.{name}.', suffix='.partial', dir=cache_dir
        )
        locked = _try_lock(fd) or fcntl is None
        if locked and os.fstat(fd).st_nlink:
            break
        # another process's clean-up took the new file before our lock
        os.close(fd)
    try:
        yield lock + '.data'
    finally:
        try:
            _remove_download_files(cache_dir, osp.basename(lock))
        finally:
            os.close(fd)


# Seconds a download may go without receiving a byte (connecting included)
# before it fails; the environment variable overrides the default.
DOWNLOAD_TIMEOUT_ENV = 'DYHEAD_DOWNLOAD_TIMEOUT'
DEFAULT_DOWNLOAD_TIMEOUT = 60.0


def download_timeout(timeout: Optional[float] = None) -> float:
    """The read timeout of a download: ``timeout`` if given, else
    ``$DYHEAD_DOWNLOAD_TIMEOUT``, else 60 seconds.

    Raises:
        CheckpointError: Not a positive number of seconds.
    """
    where, value = 'timeout', repr(timeout)
    if timeout is None:
        value = os.environ.get(DOWNLOAD_TIMEOUT_ENV)
        if value is None:
            return DEFAULT_DOWNLOAD_TIMEOUT
        where = DOWNLOAD_TIMEOUT_ENV
        try:
            timeout = float(value)
        except ValueError:
            timeout = float('nan')
    if not 0 < timeout < float('inf'):
        raise CheckpointError(
            f'{where}={value} is not a positive number of seconds. Fix: '
            f'e.g. {DOWNLOAD_TIMEOUT_ENV}=120 for a slow link.'
        )
    return timeout


def _stream(url: str, dst: str, timeout: float, progress: bool) -> str:
    """Write what ``url`` sends into ``dst``; returns its hex sha256.

    Every socket operation (connecting, each read) fails after ``timeout``
    seconds without data, so a stalled server cannot hang the caller.
    """
    request = urllib.request.Request(
        url, headers={'User-Agent': 'mmdet-dyhead'}
    )
    digest = hashlib.sha256()
    done, shown = 0, time.monotonic()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        total = response.headers.get('Content-Length')
        with open(dst, 'wb') as out:
            for chunk in iter(lambda: response.read(1 << 16), b''):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress and time.monotonic() - shown > 1:
                    shown = time.monotonic()
                    of = f' of {int(total) / 1e6:.1f}' if total else ''
                    print(
                        f'\r{url}: {done / 1e6:.1f}{of} MB',
                        end='',
                        file=sys.stderr,
                        flush=True,
                    )
    if progress:
        print(file=sys.stderr)
    return digest.hexdigest()


def download_checkpoint(
    url: str,
    sha256: Optional[str] = None,
    cache_dir: Optional[str] = None,
    progress: bool = False,
    timeout: Optional[float] = None,
) -> str:
    """Download ``url`` into ``cache_dir`` once; only a complete, checked
    torch checkpoint reaches the cached name.

    The data goes to a temporary file; the file must then have the
    expected sha256 prefix, look like a torch checkpoint and pass the
    CRC-32 check of its members, and only then is it renamed to
    ``cache_dir/<file name>``. A failed, stalled or interrupted download
    leaves nothing; the files of downloads killed earlier (SIGKILL, SIGTERM)
    are removed by the next call, those of downloads other processes are
    still running are not. A file already there is checked the same way
    before it is used.

    Args:
        url (str): http(s) URL.
        sha256 (str, optional): Expected hex prefix of the file's sha256.
        cache_dir (str, optional): Default torch.hub's checkpoint cache.
        progress (bool): Show the bytes received on stderr.
        timeout (float, optional): Seconds without data (connecting or
            reading) after which the download fails. Default
            ``$DYHEAD_DOWNLOAD_TIMEOUT``, else 60.

    Returns:
        str: The local path.
    """
    timeout = download_timeout(timeout)
    cache_dir = cache_dir or default_cache_dir()
    name = osp.basename(url.split('?', 1)[0].split('#', 1)[0])
    if not name:
        raise CheckpointError(
            f'{url} does not end in a file name. Fix: give the URL of the '
            f'checkpoint file itself.'
        )
    path = osp.join(cache_dir, name)
    remove_abandoned_downloads(cache_dir)
    if osp.isfile(path):
        check_cached_file(path, url, sha256)
        return path
    os.makedirs(cache_dir, exist_ok=True)
    elsewhere = (
        f'or fetch the file by other means and put it at {path} (it is '
        f'checked there before use)'
    )
    with _download_target(cache_dir, name) as tmp:
        try:
            digest = _stream(url, tmp, timeout, progress)
        except (TimeoutError, socket.timeout) as err:
            raise CheckpointError(
                f'The download of {url} stalled: no data for {timeout:g} s. '
                f'Nothing was cached. Fix: run again; on a slow link allow '
                f'more time with {DOWNLOAD_TIMEOUT_ENV}=SECONDS; {elsewhere}.'
            ) from err
        except (OSError, http.client.HTTPException) as err:
            reason = getattr(err, 'reason', None) or err
            if isinstance(reason, (TimeoutError, socket.timeout)):
                reason = f'no answer for {timeout:g} s'
            raise CheckpointError(
                f'Could not download {url}: {reason}. Nothing was cached. '
                f'Fix: check the network, {elsewhere}.'
            ) from err
        if sha256 and not digest.startswith(sha256.lower()):
            raise CheckpointHashError(
                f'Refused the download of {url}: its sha256 {digest[:16]}... '
                f'does not start with the published {sha256}. The server '
                f'sent another file or the transfer was damaged; nothing was '
                f'cached. Fix: run again; if it persists, the published file '
                f'changed: report it.'
            )
        problem = describe_non_checkpoint(tmp)
        if problem:
            raise CheckpointError(
                f'The download of {url} is not a torch checkpoint: {problem}. '
                f'Nothing was cached. Fix: check the URL (and whether it '
                f'needs a login).'
            )
        member = corrupt_member(tmp) if zipfile.is_zipfile(tmp) else None
        if member:
            raise CheckpointCorruptError(
                f'The download of {url} is damaged: its member {member} fails '
                f'the CRC-32 check stored in the file. Nothing was cached. '
                f'Fix: run again; if it persists, the file on the server is '
                f'damaged: report it.'
            )
        os.replace(tmp, path)
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
