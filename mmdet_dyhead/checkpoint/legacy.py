"""torch's legacy (non-zip) checkpoint format, read without unpickling.

In this format ``torch.load`` allocates every storage at the size its
pickle states (``('storage', FloatStorage, key, location, numel, view)``)
before it reads the data from the file, so a file a few bytes long can ask
for terabytes. :func:`storage_bytes` adds those sizes up from the pickle's
opcodes (``pickletools``, nothing is built or called), for the loader to
compare with the file's size first.
"""

import pickletools
from typing import Optional

import torch

_VALUES = {
    'BINUNICODE',
    'SHORT_BINUNICODE',
    'BINUNICODE8',
    'UNICODE',
    'BINSTRING',
    'SHORT_BINSTRING',
    'STRING',
    'BININT',
    'BININT1',
    'BININT2',
    'LONG1',
    'LONG4',
    'INT',
    'LONG',
}
_PUT = {'BINPUT', 'LONG_BINPUT', 'PUT'}
_GET = {'BINGET', 'LONG_BINGET', 'GET'}


class _Opaque:
    """A value on the pickle's stack that the reader does not follow."""


def _element_size(storage_type) -> int:
    """Bytes per element of a pickled storage class (``'torch
    FloatStorage'``); 1 when the name is not one torch knows (the load
    refuses such a name before it allocates)."""
    if not (isinstance(storage_type, tuple) and storage_type[0] == 'GLOBAL'):
        return 1
    name = storage_type[1].rpartition(' ')[2]
    try:
        return torch.serialization.StorageType(name).dtype.itemsize
    except (KeyError, AttributeError, RuntimeError):
        return 1


def storage_bytes(path: str) -> Optional[int]:
    """The bytes ``torch.load`` would allocate for the storages of legacy
    checkpoint ``path``, or None when a storage's size is not written as a
    plain number (torch.save always writes one).

    Args:
        path (str): A file in torch's legacy format.
    """
    total, seen, memo = 0, set(), {}
    groups = [[]]  # the values since each open MARK
    with open(path, 'rb') as f:
        for _ in range(3):  # magic number, protocol version, system info
            for _ in pickletools.genops(f):
                pass
        for op, arg, _ in pickletools.genops(f):
            name, top = op.name, groups[-1]
            if name == 'MARK':
                groups.append([])
            elif name == 'TUPLE':
                items = groups.pop() if len(groups) > 1 else []
                groups[-1].append(tuple(items))
            elif name in _PUT:
                memo[arg] = top[-1] if top else _Opaque()
            elif name == 'MEMOIZE':
                memo[len(memo)] = top[-1] if top else _Opaque()
            elif name in _GET:
                top.append(memo.get(arg, _Opaque()))
            elif name == 'BINPERSID':
                pid = top.pop() if top else None
                if isinstance(pid, tuple) and pid[:1] == ('storage',):
                    if len(pid) < 5 or type(pid[4]) is not int:
                        return None
                    key = pid[2] if isinstance(pid[2], str) else id(pid)
                    if key not in seen:
                        seen.add(key)
                        total += max(pid[4], 0) * _element_size(pid[1])
                top.append(_Opaque())
            elif name == 'GLOBAL':
                top.append(('GLOBAL', arg))
            elif name in _VALUES:
                top.append(arg)
            elif name == 'STOP':
                break
            else:
                top.append(_Opaque())
    return total
