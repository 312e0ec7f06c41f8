"""Let torch's ``weights_only`` loader read mmengine checkpoints.

torch >= 2.6 loads with ``weights_only=True``: only tensors, containers and
allow-listed classes are unpickled. mmengine 0.10.7's Runner stores its
``message_hub`` (``HistoryBuffer`` objects holding numpy arrays) in every
checkpoint, so ``tools/test.py`` and ``--resume`` fail on self-trained
checkpoints. Instead of switching the check off (``weights_only=False`` or
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``), we allow-list exactly the data
classes those checkpoints contain. None of them runs code on unpickling:
``HistoryBuffer`` is restored by setting its ``__dict__``, and the numpy
entries rebuild arrays, dtypes and scalars from raw bytes. Any other global
(``os.system``, ``eval``, arbitrary classes) is still refused.

One entry needs care: a ``HistoryBuffer`` pickles its statistics methods as
``getattr(HistoryBuffer, 'min')``. Allow-listing ``builtins.getattr`` itself
would let a checkpoint read any attribute of any loadable object, so the name
``builtins.getattr`` is bound to :func:`history_buffer_getattr`, which only
returns HistoryBuffer's registered statistics methods.
"""
import pickle
from typing import List

import torch

_REGISTERED = False


def history_buffer_getattr(obj, name: str):
    """``getattr`` as seen by the weights-only unpickler: statistics only."""
    from mmengine.logging.history_buffer import HistoryBuffer
    if obj is HistoryBuffer and name in HistoryBuffer._statistics_methods:
        return getattr(HistoryBuffer, name)
    if obj is HistoryBuffer and name in ('min', 'max', 'current', 'mean'):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'checkpoint asks for getattr({obj!r}, {name!r}); only '
        f'HistoryBuffer statistics methods are allowed in weights_only loads.')


def mmengine_checkpoint_globals() -> List[object]:
    """The non-tensor classes and functions an mmengine checkpoint pickles."""
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    safe = [HistoryBuffer, _reconstruct, scalar, np.ndarray, np.dtype,
            (history_buffer_getattr, 'builtins.getattr')]
    # numpy >= 1.25 pickles dtypes by their class (numpy.dtypes.Float64DType).
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        safe += [getattr(dtypes, name) for name in dir(dtypes)
                 if name.endswith('DType') and isinstance(getattr(dtypes, name), type)]
    return safe


def register_mmengine_safe_globals() -> bool:
    """Allow-list :func:`mmengine_checkpoint_globals` once per process.

    Returns False on torch without ``add_safe_globals`` (< 2.4), where
    ``torch.load`` does not default to ``weights_only=True`` anyway.
    """
    global _REGISTERED
    if _REGISTERED:
        return True
    add_safe_globals = getattr(torch.serialization, 'add_safe_globals', None)
    if add_safe_globals is None:
        return False
    add_safe_globals(mmengine_checkpoint_globals())
    _REGISTERED = True
    return True
