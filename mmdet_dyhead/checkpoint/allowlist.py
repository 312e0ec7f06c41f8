"""The classes of an mmengine training checkpoint, allow-listed for torch's
weights-only unpickler.

mmengine's Runner stores its ``message_hub`` (``HistoryBuffer`` objects
holding numpy arrays and scalars) in every checkpoint it writes, which
``torch.load(..., weights_only=True)`` refuses. :func:`mmengine_safe_globals`
allow-lists exactly those data classes for a ``with`` block; the package's
loader (:func:`mmdet_dyhead.checkpoint.load`) reads every file inside it.
None of them runs code on unpickling: ``HistoryBuffer`` is restored by
setting its ``__dict__``, and the numpy entries rebuild arrays, dtypes and
scalars from raw bytes. Any other global (``os.system``, ``eval``,
arbitrary classes) is still refused.

One entry needs care: a ``HistoryBuffer`` pickles its statistics methods as
``getattr(HistoryBuffer, 'min')``. Allow-listing ``builtins.getattr`` itself
would let a checkpoint read any attribute of any loadable object, so the name
``builtins.getattr`` is bound to :func:`history_buffer_getattr`, which only
returns HistoryBuffer's registered statistics methods.
"""

import contextlib
import pickle
from typing import ContextManager, List

import torch


def history_buffer_getattr(obj, name: str):
    """``getattr`` as seen by the weights-only unpickler: statistics only."""
    from mmengine.logging.history_buffer import HistoryBuffer

    allowed = set(HistoryBuffer._statistics_methods) | {
        'min',
        'max',
        'current',
        'mean',
    }
    if obj is HistoryBuffer and name in allowed:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'checkpoint asks for getattr({obj!r}, {name!r}); only '
        f'HistoryBuffer statistics methods are allowed in weights_only loads.'
    )


def mmengine_checkpoint_globals() -> List[object]:
    """The non-tensor classes and functions an mmengine checkpoint pickles."""
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    safe = [
        HistoryBuffer,
        _reconstruct,
        scalar,
        np.ndarray,
        np.dtype,
        (history_buffer_getattr, 'builtins.getattr'),
    ]
    # numpy >= 1.25 pickles dtypes by their class (numpy.dtypes.Float64DType).
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        safe += [
            getattr(dtypes, name)
            for name in dir(dtypes)
            if name.endswith('DType')
            and isinstance(getattr(dtypes, name), type)
        ]
    return safe


def mmengine_safe_globals() -> ContextManager[None]:
    """``with mmengine_safe_globals(): ...`` loads mmengine checkpoints
    weights-only; the allow-list is gone when the block ends.

    On torch < 2.5 (no ``torch.serialization.safe_globals``, and
    ``weights_only`` is not the default there) it does nothing.
    """
    scoped = getattr(torch.serialization, 'safe_globals', None)
    if scoped is None:
        return contextlib.nullcontext()
    return scoped(mmengine_checkpoint_globals())
