"""Checkpoint loading that checks what it loads.

Three problems with loading through mmengine 0.10.7 as released:

1. ``load_from=<url>`` and ``open-mmlab://`` weights go through
   ``torch.hub.load_state_dict_from_url`` with its defaults, i.e.
   ``weights_only=False`` (a downloaded file may run arbitrary code when it
   is unpickled) and ``check_hash=False`` (a truncated or replaced download
   is loaded, or fails with an unpickling error).
2. A corrupt or foreign file fails deep inside ``torch.load`` with a message
   that says nothing about the file.
3. Missing and unexpected keys are printed as one comma-separated line per
   kind: thousands of names when a checkpoint does not fit.

:func:`enable_checked_loading` (run when ``mmdet_dyhead`` is imported, which
every config of this package does through ``custom_imports``) fixes all three
at mmengine's single entry point, its ``CheckpointLoader`` scheme table,
without touching the Runner or the tools:

- ``http://``/``https://`` (and ``open-mmlab://``, which resolves to https)
  download into torch's hub cache as before, then check the file's sha256
  against the prefix in its name (OpenMMLab's ``...-<8 hex>.pth`` rule,
  which is also torch.hub's) and load with ``weights_only=True``.
- Local paths load with ``weights_only=True`` and get the same name check.
- mmengine's ``load_state_dict`` is replaced by :func:`load_state_dict`, same
  signature and semantics (strict raises, otherwise a warning), whose report
  groups the keys by module (see :class:`KeyReport`).

The same functions serve scripts directly: :func:`load_checkpoint` loads
into a model and returns the :class:`KeyReport`.
"""
import hashlib
import os
import os.path as osp
import pickle
import re
import tempfile
import zipfile
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple
from urllib.error import URLError
from urllib.parse import urlparse

import torch

# OpenMMLab's publish_model and torch.hub both name a file
# ``<stem>-<first hex digits of its sha256>.<ext>``.
HASH_IN_NAME = re.compile(r'-([0-9a-f]{8,64})\.[A-Za-z0-9]+$')

_ENABLED = False


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used as it is."""


class CheckpointHashError(CheckpointError):
    """A checkpoint whose sha256 differs from the one it is published with."""


class CheckpointKeyError(CheckpointError):
    """A checkpoint whose keys or shapes do not fit the model (strict load)."""


# ----------------------------------------------------------------------------
# integrity
# ----------------------------------------------------------------------------
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


def hash_prefix_from_name(name: str) -> Optional[str]:
    """The sha256 prefix a file or URL name promises, or None.

    Args:
        name (str): A path, file name or URL ending in ``-<hex>.<ext>``.
    """
    base = osp.basename(urlparse(name).path if '://' in name else name)
    match = HASH_IN_NAME.search(base)
    return match.group(1) if match else None


def verify_sha256(path: str, expected_prefix: Optional[str],
                  source: Optional[str] = None) -> Optional[str]:
    """Refuse ``path`` unless its sha256 starts with ``expected_prefix``.

    Args:
        path (str): The local file to check.
        expected_prefix (str, optional): Hex prefix; None skips the check.
        source (str, optional): Where the file came from (a URL), for the
            message.

    Returns:
        str | None: The full hex digest, or None when nothing was checked.

    Raises:
        CheckpointHashError: The digest does not start with the prefix.
    """
    if not expected_prefix:
        return None
    digest = sha256_of(path)
    if not digest.startswith(expected_prefix.lower()):
        origin = f' (downloaded from {source})' if source else ''
        raise CheckpointHashError(
            f'Refusing checkpoint {path}{origin}: its sha256 is '
            f'{digest[:len(expected_prefix)]}... but it is published as '
            f'{expected_prefix}... (the hash in its file name). The file is '
            f'truncated, corrupt or not the published one. Fix: delete it and '
            f'download it again; if you changed the file on purpose, rename it '
            f'so its name no longer ends in -{expected_prefix}.')
    return digest


def default_cache_dir() -> str:
    """torch.hub's checkpoint cache (``$TORCH_HOME/hub/checkpoints``), the
    directory mmengine's own http loader uses, so caches are shared."""
    return osp.join(torch.hub.get_dir(), 'checkpoints')


def download_checkpoint(url: str,
                        cache_dir: Optional[str] = None,
                        sha256_prefix: Optional[str] = None,
                        progress: bool = False) -> str:
    """Download ``url`` once into ``cache_dir`` and check its sha256.

    A file already in the cache is checked too (torch.hub trusts it blindly).
    The download goes to a temporary file that only replaces the cached name
    after the check passed, so a failed or refused download leaves nothing.

    Args:
        url (str): http(s) URL of the checkpoint.
        cache_dir (str, optional): Where to keep it. Default: torch.hub's.
        sha256_prefix (str, optional): Expected hex prefix of the sha256.
            Default: the one in the file name (``-<hex>.pth``), if any.
        progress (bool): Show a progress bar.

    Returns:
        str: The local path.
    """
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    name = osp.basename(urlparse(url).path)
    if not name:
        raise CheckpointError(f'{url} does not end in a file name.')
    expected = sha256_prefix or hash_prefix_from_name(name)
    path = osp.join(cache_dir, name)
    if osp.isfile(path):
        verify_sha256(path, expected, source=f'the cache for {url}')
        return path
    fd, tmp = tempfile.mkstemp(prefix=name + '.', suffix='.part', dir=cache_dir)
    os.close(fd)
    try:
        try:
            torch.hub.download_url_to_file(url, tmp, hash_prefix=None,
                                           progress=progress)
        except (URLError, OSError) as err:
            raise CheckpointError(
                f'Could not download {url}: {err}. Fix: check the network, or '
                f'download the file by other means and put it at {path} (it is '
                f'used from there and checked against its name).') from err
        verify_sha256(tmp, expected, source=url)
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)
    return path


# ----------------------------------------------------------------------------
# weights-only loading with clear errors
# ----------------------------------------------------------------------------
def _describe_start(path: str) -> str:
    with open(path, 'rb') as f:
        head = f.read(64)
    if head.lstrip().lower().startswith((b'<!doctype', b'<html', b'<?xml')):
        return ('it is an HTML/XML page, not a checkpoint (a wrong URL or a '
                'login/error page was saved)')
    if not head:
        return 'it is empty'
    return f'it starts with {head[:16]!r}'


def load_weights_only(path: str, map_location=None) -> object:
    """``torch.load(path, weights_only=True)`` with errors that name the fix.

    Args:
        path (str): A local checkpoint file.
        map_location: As in :func:`torch.load`.

    Raises:
        CheckpointError: The file is missing, not a torch file, truncated, or
            holds Python objects the weights-only unpickler refuses.
    """
    path = osp.expanduser(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'Checkpoint {path} does not exist.')
    start = _describe_start(path)
    if not start.startswith('it starts with'):
        raise CheckpointError(f'{path} is not a torch checkpoint: {start}. Fix: '
                              'download it again or check the path.')
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if 'Weights only load failed' in text or 'Unsupported global' in text:
            found = re.search(r'Unsupported global: GLOBAL ([\w.]+)', text)
            what = found.group(1) if found else 'a non-tensor object'
            raise CheckpointError(
                f'Checkpoint {path} contains {what}, which a weights-only load '
                f'refuses (unpickling it could run code). Fix: if the file '
                f'comes from a source you trust, load it once with '
                f'torch.load(path, weights_only=False) and save only its '
                f"'state_dict' (tensors) and plain 'meta'; detectron2/official "
                f'DyHead files go through tools/convert_official_dyhead.py.'
            ) from err
        raise CheckpointError(
            f'{path} is not a torch checkpoint: {_describe_start(path)} '
            f'({text.splitlines()[0]}). Fix: download it again or check the '
            f'path.') from err
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f'Cannot read checkpoint {path}: {str(err).splitlines()[0]}. The '
            f'file is truncated or corrupt ({_describe_start(path)}). Fix: '
            f'delete it and download or copy it again.') from err


def load_from_local_checked(filename: str, map_location=None) -> object:
    """mmengine scheme loader for local paths (weights-only, name-hash check).

    Args:
        filename (str): Local path.
        map_location: As in :func:`torch.load`.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    verify_sha256(filename, hash_prefix_from_name(filename))
    return load_weights_only(filename, map_location)


def load_from_http_checked(filename: str, map_location=None,
                           model_dir: Optional[str] = None,
                           progress: bool = False) -> object:
    """mmengine scheme loader for URLs: download, hash check, weights-only.

    In distributed runs rank 0 downloads first and the others then read the
    verified cache (the same order as mmengine's loader).

    Args:
        filename (str): http(s) URL.
        map_location: As in :func:`torch.load`.
        model_dir (str, optional): Cache directory (default torch.hub's).
        progress (bool): Show a progress bar.
    """
    from mmengine.dist import get_dist_info
    rank, world_size = get_dist_info()
    path = None
    if rank == 0:
        path = download_checkpoint(filename, model_dir, progress=progress)
    if world_size > 1:
        torch.distributed.barrier()
        if rank > 0:
            path = download_checkpoint(filename, model_dir, progress=False)
    return load_weights_only(path, map_location)


# ----------------------------------------------------------------------------
# grouped key report
# ----------------------------------------------------------------------------
def _ranges(numbers: Iterable[int]) -> str:
    nums = sorted(set(numbers))
    parts, start = [], None
    for i, n in enumerate(nums):
        if start is None:
            start = n
        if i + 1 == len(nums) or nums[i + 1] != n + 1:
            parts.append(str(start) if start == n else f'{start}-{n}')
            start = None
    return parts[0] if len(parts) == 1 and '-' not in parts[0] else '{' + ','.join(parts) + '}'


def group_keys(keys: Iterable[str]) -> List[Tuple[str, List[str], int]]:
    """Group parameter names by module, folding numbered copies together.

    ``neck.1.dyhead_blocks.{0-5}.spatial_attn.mid_branch.conv`` stands for
    the six blocks' convs. Each group lists its parameter names.

    Args:
        keys (Iterable[str]): Dotted state-dict keys.

    Returns:
        list[tuple[str, list[str], int]]: ``(module pattern, param names,
        number of keys)``, in first-seen order.
    """
    groups: 'OrderedDict[Tuple, Dict]' = OrderedDict()
    for key in keys:
        parts = key.split('.')
        module, leaf = parts[:-1], parts[-1]
        shape = tuple('#' if p.isdigit() else p for p in module)
        group = groups.setdefault(shape, dict(nums={}, leaves=[], count=0))
        for pos, part in enumerate(module):
            if part.isdigit():
                group['nums'].setdefault(pos, set()).add(int(part))
        if leaf not in group['leaves']:
            group['leaves'].append(leaf)
        group['count'] += 1
    out = []
    for shape, group in groups.items():
        name = '.'.join(_ranges(group['nums'][pos]) if part == '#' else part
                        for pos, part in enumerate(shape))
        out.append((name or '<root>', group['leaves'], group['count']))
    return out


class KeyReport:
    """How a state dict fitted a model.

    Args:
        missing (Sequence[str]): Model keys the checkpoint lacks.
        unexpected (Sequence[str]): Checkpoint keys the model lacks.
        mismatched (Sequence[tuple]): ``(key, checkpoint shape, model shape)``.
    """

    def __init__(self, missing: Sequence[str] = (),
                 unexpected: Sequence[str] = (),
                 mismatched: Sequence[Tuple[str, tuple, tuple]] = ()) -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)

    @property
    def ok(self) -> bool:
        """True when every key fitted."""
        return not (self.missing or self.unexpected or self.mismatched)

    def hints(self) -> List[str]:
        """Likely causes, recognised from the key names."""
        hints = []
        if any('dyhead_tower' in k for k in self.unexpected):
            hints.append('The checkpoint is an official microsoft/DynamicHead '
                         '(detectron2) one: convert it first with '
                         'tools/convert_official_dyhead.py.')
        if self.unexpected and all(k.startswith('module.') for k in self.unexpected):
            hints.append("Every unexpected key starts with 'module.': strip it "
                         "(revise_keys=[(r'^module\\.', '')]).")
        branch_bias = re.compile(r'(spatial_conv_(high|mid|low)|_branch)\.conv\.bias$')
        if any(branch_bias.search(k) for k in self.missing):
            hints.append("The model has DCN biases (preset='official') but the "
                         "checkpoint does not (mmdet's DyHead): use "
                         "DyHeadNeck(preset='mmdet') or dcn_bias=False.")
        if any(branch_bias.search(k) for k in self.unexpected):
            hints.append("The checkpoint has DCN biases (official DyHead) but "
                         "the model does not: use DyHeadNeck(preset='official') "
                         'or dcn_bias=True.')
        return hints

    def format(self, max_groups: int = 30) -> str:
        """The report as text, one line per module group.

        Args:
            max_groups (int): Groups shown per section before eliding.
        """
        lines = []
        sections = (('missing keys (in the model, not in the checkpoint)', self.missing),
                    ('unexpected keys (in the checkpoint, not in the model)', self.unexpected))
        for title, keys in sections:
            if not keys:
                continue
            tops = OrderedDict()
            for k in keys:
                tops[k.split('.')[0]] = tops.get(k.split('.')[0], 0) + 1
            groups = group_keys(keys)
            lines.append(f'{len(keys)} {title}, {len(groups)} module group(s); '
                         'by top-level module: ' +
                         ', '.join(f'{t} {n}' for t, n in tops.items()))
            for name, leaves, count in groups[:max_groups]:
                lines.append(f'  {name}: {", ".join(leaves)} ({count} key'
                             f'{"s" if count > 1 else ""})')
            if len(groups) > max_groups:
                lines.append(f'  ... and {len(groups) - max_groups} more groups')
        if self.mismatched:
            lines.append(f'{len(self.mismatched)} shape mismatch(es) (not loaded):')
            for key, got, want in self.mismatched[:max_groups]:
                lines.append(f'  {key}: checkpoint {tuple(got)}, model {tuple(want)}')
            if len(self.mismatched) > max_groups:
                lines.append(f'  ... and {len(self.mismatched) - max_groups} more')
        for hint in self.hints():
            lines.append(f'hint: {hint}')
        return '\n'.join(lines) if lines else 'all keys matched'

    __str__ = format


def load_state_dict(module: torch.nn.Module, state_dict: Dict,
                    strict: bool = False, logger=None) -> KeyReport:
    """Load ``state_dict`` into ``module``, reporting keys grouped by module.

    Drop-in for ``mmengine.runner.checkpoint.load_state_dict``: model
    wrappers are unwrapped, tensors of a different shape are skipped and
    reported, missing BN ``num_batches_tracked`` counters are not reported
    (they carry no weights), and a mismatch raises when ``strict``, else is
    logged as a warning.

    Args:
        module (nn.Module): The model (or a wrapper such as DDP).
        state_dict (dict): Weights.
        strict (bool): Raise :class:`CheckpointKeyError` on any mismatch.
        logger: mmengine logger name or object for the warning.

    Returns:
        KeyReport: What did not fit.
    """
    import logging

    from mmengine.logging import print_log
    from mmengine.model import is_model_wrapper
    if is_model_wrapper(module):
        module = module.module
    metadata = getattr(state_dict, '_metadata', None)
    own = module.state_dict()
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape))
                  for k, v in state_dict.items()
                  if k in own and hasattr(v, 'shape') and v.shape != own[k].shape]
    skip = {k for k, _, _ in mismatched}
    filtered = OrderedDict((k, v) for k, v in state_dict.items() if k not in skip)
    if metadata is not None:
        filtered._metadata = metadata
    try:
        result = module.load_state_dict(filtered, strict=False)
    except RuntimeError as err:
        # Shapes of keys that a submodule renames while loading (mmdet's
        # DyHead names) are only known to torch's own check.
        raise CheckpointKeyError(f'Checkpoint does not fit the model: {err}') from err
    missing = [k for k in result.missing_keys if not k.endswith('num_batches_tracked')]
    report = KeyReport(missing, result.unexpected_keys, mismatched)
    if not report.ok:
        text = 'The checkpoint does not fit the model:\n' + report.format()
        if strict:
            raise CheckpointKeyError(text)
        print_log(text, logger=logger or 'current', level=logging.WARNING)
    return report


def extract_state_dict(checkpoint: object, source: str = 'checkpoint') -> Dict:
    """The weights inside a loaded checkpoint (``state_dict`` or ``model`` entry,
    or the dict itself).

    Args:
        checkpoint: What :func:`torch.load` returned.
        source (str): Name for the error message.
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'{source} holds a {type(checkpoint).__name__}, '
                              'not a dict of weights.')
    for key in ('state_dict', 'model'):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    if checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
        return checkpoint
    raise CheckpointError(
        f'{source} has no weights: no "state_dict" or "model" entry and its '
        f'values are not tensors (top-level keys: {sorted(checkpoint)[:10]}).')


def load_checkpoint(model: torch.nn.Module, filename: str,
                    map_location='cpu', strict: bool = True,
                    revise_keys: Sequence[Tuple[str, str]] = ((r'^module\.', ''),),
                    logger=None) -> KeyReport:
    """Load a local or http(s) checkpoint into ``model``, checked.

    Args:
        model (nn.Module): Target model.
        filename (str): Path, URL or any mmengine checkpoint scheme.
        map_location: As in :func:`torch.load`. Default 'cpu'.
        strict (bool): Raise on any key or shape mismatch. Default True.
        revise_keys (Sequence[tuple[str, str]]): Regex renames applied to
            the keys first (default strips DDP's ``module.``).
        logger: mmengine logger for a non-strict warning.

    Returns:
        KeyReport: What did not fit (empty when strict succeeded).
    """
    from mmengine.runner.checkpoint import CheckpointLoader
    enable_checked_loading()
    checkpoint = CheckpointLoader.load_checkpoint(filename, map_location,
                                                  logger=logger or 'current')
    state_dict = extract_state_dict(checkpoint, filename)
    for pattern, repl in revise_keys:
        state_dict = OrderedDict((re.sub(pattern, repl, k), v)
                                 for k, v in state_dict.items())
    return load_state_dict(model, state_dict, strict=strict, logger=logger)


def enable_checked_loading() -> None:
    """Route mmengine's checkpoint loading through this module (idempotent).

    Registers :func:`load_from_http_checked` for ``http://``/``https://`` and
    :func:`load_from_local_checked` for plain paths in mmengine's
    ``CheckpointLoader``, points the ``open-mmlab://``/``torchvision://``
    loaders (which call mmengine's ``load_from_http`` by module name) at the
    checked download, and swaps in :func:`load_state_dict` for the key report.
    """
    global _ENABLED
    if _ENABLED:
        return
    from mmengine.runner import checkpoint as mm_ckpt
    mm_ckpt.CheckpointLoader.register_scheme(
        ('http://', 'https://'), load_from_http_checked, force=True)
    mm_ckpt.CheckpointLoader.register_scheme(
        '', load_from_local_checked, force=True)
    mm_ckpt.load_from_http = load_from_http_checked
    mm_ckpt.load_state_dict = load_state_dict
    _ENABLED = True
