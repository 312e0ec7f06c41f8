"""The classes of an mmengine training checkpoint, allow-listed for torch's
weights-only unpickler, each behind a check of what the file asks for.

mmengine's Runner stores its ``message_hub`` (``HistoryBuffer`` objects
holding numpy arrays and scalars) in every checkpoint it writes, which
``torch.load(..., weights_only=True)`` refuses. :func:`mmengine_safe_globals`
allow-lists the names such a file uses for a ``with`` block; the package's
loader (:func:`mmdet_dyhead.checkpoint.load`) reads every file inside it.
Any other global (``os.system``, ``eval``, arbitrary classes) is still
refused.

A pickle calls what it names with arguments of its choosing, so none of the
numpy names is bound to numpy itself:

- ``numpy.dtype`` builds a :class:`NumpyDType` stand-in whose state must be
  the one numpy writes for a plain dtype (numpy's own ``__setstate__``
  accepts flags that make a float dtype hold object pointers);
- ``numpy.core.multiarray._reconstruct`` (numpy 1.x and 2.x names) builds a
  :class:`NumpyArray` stand-in that allocates nothing until its state, with
  the data bytes, has been checked against the shape; arrays of Python
  objects are refused, and together the arrays of one file may not hold
  more bytes than the file;
- ``numpy.core.multiarray.scalar`` takes plain dtypes and exactly one
  item's bytes;
- ``builtins.getattr`` is :func:`history_buffer_getattr`, which returns only
  HistoryBuffer's statistics methods (mmengine pickles them as
  ``getattr(HistoryBuffer, 'min')``);
- ``builtins.bytes`` only makes ``b''`` (how pickle protocol 2 writes the
  data of an empty array);
- ``numpy.ndarray`` is a marker that only ``_reconstruct`` accepts.

:func:`finish_load` then puts the real arrays and dtypes in place of the
stand-ins and checks what torch's own rebuild functions (which cannot be
wrapped: torch's allow-list is looked up first) and ``HistoryBuffer`` built:
no tensor may view more bytes than the file holds (zero strides make a
2^40-element view of 4 bytes), and a HistoryBuffer's histories must be
numeric 1-d arrays of one length. A refusal raises :class:`RefusedCall`.
"""

import contextlib
import math
import pickle
from typing import ContextManager, List, Optional

import torch


class RefusedCall(pickle.UnpicklingError):
    """A call in a checkpoint's pickle that the allow-list refuses.

    Args:
        name (str): The global the pickle names, e.g. ``builtins.getattr``.
        reason (str): What the call asked for, and why it is refused.
    """

    def __init__(self, name: str, reason: str):
        super().__init__(f'refused global {name}: {reason}')
        self.name, self.reason = name, reason


def history_buffer_getattr(obj, name: str):
    """``getattr`` as seen by the weights-only unpickler: statistics only."""
    from mmengine.logging.history_buffer import HistoryBuffer

    allowed = set(HistoryBuffer._statistics_methods) | {
        'min',
        'max',
        'current',
        'mean',
    }
    if obj is HistoryBuffer and isinstance(name, str) and name in allowed:
        return getattr(HistoryBuffer, name)
    raise RefusedCall(
        'builtins.getattr',
        f'the pickle asks for getattr({_short(obj)}, {_short(name)}); only '
        f"HistoryBuffer's statistics methods ({', '.join(sorted(allowed))})"
        f' may be looked up',
    )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + '...'


class _NdarrayName:
    """What the name ``numpy.ndarray`` stands for in a pickle: only
    ``_reconstruct`` takes it (calling numpy's class would allocate the
    shape the file asks for)."""

    def __repr__(self):
        return 'numpy.ndarray'


NDARRAY = _NdarrayName()


def _plain_dtype(spec, name: str):
    """numpy's dtype for ``spec`` (e.g. ``'f8'``, ``b'b'``), refusing
    Python-object and structured dtypes."""
    import numpy as np

    if isinstance(spec, NumpyDType):
        return spec.dtype
    if not isinstance(spec, (str, bytes)):
        raise RefusedCall(name, f'dtype {_short(spec)} is not a dtype name')
    try:
        dtype = np.dtype(spec)
    except TypeError as err:
        raise RefusedCall(name, f'dtype {_short(spec)}: {err}') from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype:
        raise RefusedCall(
            name,
            f'dtype {dtype} holds Python objects or fields; mmengine '
            f'checkpoints hold plain numbers',
        )
    return dtype


class NumpyDType:
    """Stands for ``numpy.dtype(spec, align, copy)`` while a file loads.

    Args:
        spec (str): The dtype name numpy pickles, e.g. ``'f8'``.
        align (bool): As numpy pickles it (ignored for plain dtypes).
        copy (bool): As numpy pickles it.
    """

    NAME = 'numpy.dtype'
    dtype = None  # also when a pickle makes one without calling it

    def __init__(self, spec, align=False, copy=False):
        self.dtype = _plain_dtype(spec, self.NAME)

    def __setstate__(self, state):
        if self.dtype is None:
            raise RefusedCall(self.NAME, 'a dtype built without its name')
        # The state must be what numpy writes for this dtype in one of the
        # byte orders: other flags or sizes are how a file would make
        # numpy read numbers as object pointers.
        for order in ('<', '>', '|', '='):
            dtype = self.dtype.newbyteorder(order)
            if dtype.__reduce__()[2] == state:
                self.dtype = dtype
                return
        raise RefusedCall(
            self.NAME,
            f'the state {_short(state)} is not one numpy writes for '
            f'{self.dtype}',
        )


def _multiarray(attr: str) -> str:
    """The name this numpy pickles ``attr`` of its multiarray module as."""
    import numpy as np

    major = int(np.__version__.split('.')[0])
    return f'numpy.{"_core" if major >= 2 else "core"}.multiarray.{attr}'


class NumpyArray:
    """Stands for the array numpy's ``_reconstruct`` + ``__setstate__``
    pickle builds; the array is made by :meth:`__setstate__` once the data
    bytes match the shape and fit the file's budget.

    Args:
        budget (_Budget): Bytes the arrays of this file may still take.
    """

    budget = array = None  # also when a pickle makes one without calling it

    def __init__(self, budget: '_Budget'):
        self.budget = budget

    def __setstate__(self, state):
        import numpy as np

        name = _multiarray('_reconstruct')
        if not isinstance(self.budget, _Budget) or self.array is not None:
            raise RefusedCall(name, 'an array not made by _reconstruct')
        if not (isinstance(state, tuple) and len(state) == 5):
            raise RefusedCall(name, f'array state {_short(state)}')
        version, shape, dtype, fortran, data = state
        dtype = _plain_dtype(dtype, name)
        count = _element_count(shape, name)
        nbytes = count * dtype.itemsize
        if not isinstance(data, bytes) or len(data) != nbytes:
            got = len(data) if isinstance(data, bytes) else type(data).__name__
            raise RefusedCall(
                name,
                f'an array of shape {shape} and dtype {dtype} needs '
                f'{nbytes} bytes of data, the pickle gives {got}',
            )
        self.budget.take(nbytes, f'an array of shape {shape}')
        array = np.ndarray.__new__(np.ndarray, (0,), np.uint8)
        try:
            array.__setstate__((version, shape, dtype, fortran, data))
        except (TypeError, ValueError) as err:
            raise RefusedCall(name, f'array state: {err}') from None
        self.array = array


def _element_count(shape, name: str) -> int:
    if isinstance(shape, int):
        shape = (shape,)
    if not (
        isinstance(shape, tuple)
        and all(isinstance(n, int) and n >= 0 for n in shape)
    ):
        raise RefusedCall(name, f'shape {_short(shape)} is not a shape')
    return math.prod(shape)


class _Budget:
    """Bytes the numpy arrays of one file may take together: the file's
    size, since their data is part of the file."""

    def __init__(self, max_bytes: Optional[int]):
        self.left = max_bytes

    def take(self, nbytes: int, what: str) -> None:
        if self.left is None:
            return
        if nbytes > self.left:
            raise RefusedCall(
                _multiarray('_reconstruct'),
                f'{what} needs {nbytes} bytes, more than the file holds for '
                f'it ({self.left} bytes left of the file size)',
            )
        self.left -= nbytes


def _reconstruct(budget: _Budget):
    def reconstruct(cls, shape, dtype):
        """``numpy...._reconstruct(ndarray, (0,), b'b')``: a stand-in."""
        name = _multiarray('_reconstruct')
        if cls is not NDARRAY:
            raise RefusedCall(name, f'it builds {_short(cls)}, not an ndarray')
        itemsize = _plain_dtype(dtype, name).itemsize
        count = _element_count(shape, name)
        # numpy would allocate this shape here; pickles ask for (0,)
        budget.take(count * itemsize, f'an empty array of shape {shape}')
        return NumpyArray(budget)

    return reconstruct


def numpy_scalar(dtype, data):
    """``numpy...scalar(dtype, bytes)`` for plain dtypes, exactly one item's
    bytes."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar
    name = _multiarray('scalar')
    dtype = _plain_dtype(dtype, name)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise RefusedCall(
            name,
            f'a {dtype} scalar takes {dtype.itemsize} bytes, the pickle '
            f'gives {_short(data)}',
        )
    return scalar(np.dtype(dtype), data)


def empty_bytes(*args) -> bytes:
    """``builtins.bytes`` as pickle protocol 2 uses it: ``bytes()`` is how
    it writes ``b''`` (the data of an empty array); ``bytes(n)`` would
    allocate what the file asks for."""
    if args:
        raise RefusedCall(
            'builtins.bytes', f'bytes{_short(args)}: only bytes() is allowed'
        )
    return b''


def mmengine_checkpoint_globals(
    max_bytes: Optional[int] = None,
) -> List[object]:
    """The names an mmengine checkpoint pickles, bound to checked versions.

    Args:
        max_bytes (int, optional): Bytes the numpy arrays of the file may
            take together (its size); None for no limit.
    """
    from mmengine.logging.history_buffer import HistoryBuffer

    reconstruct = _reconstruct(_Budget(max_bytes))
    safe = [
        HistoryBuffer,
        NumpyDType,
        NumpyArray,
        (NDARRAY, 'numpy.ndarray'),
        (NumpyDType, 'numpy.dtype'),
        (history_buffer_getattr, 'builtins.getattr'),
        (empty_bytes, 'builtins.bytes'),
    ]
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        safe += [
            (reconstruct, f'{module}._reconstruct'),
            (numpy_scalar, f'{module}.scalar'),
        ]
    return safe


def mmengine_safe_globals(
    max_bytes: Optional[int] = None,
) -> ContextManager[None]:
    """``with mmengine_safe_globals(): ...`` loads mmengine checkpoints
    weights-only; the allow-list is gone when the block ends. What the
    block loads holds stand-ins for numpy objects: pass it through
    :func:`finish_load`.

    On torch < 2.5 (no ``torch.serialization.safe_globals``, and
    ``weights_only`` is not the default there) it does nothing.

    Args:
        max_bytes (int, optional): Bytes the numpy arrays of the file may
            take together (its size); None for no limit.
    """
    scoped = getattr(torch.serialization, 'safe_globals', None)
    if scoped is None:
        return contextlib.nullcontext()
    return scoped(mmengine_checkpoint_globals(max_bytes))


def finish_load(obj, max_bytes: Optional[int] = None):
    """What a load inside :func:`mmengine_safe_globals` returned, with the
    real numpy arrays and dtypes in place of the stand-ins, after checking
    its tensors and HistoryBuffers.

    Args:
        obj: The loaded object.
        max_bytes (int, optional): The file's size: no tensor may view more
            bytes than that.

    Raises:
        RefusedCall: A tensor views more bytes than the file holds, or a
            HistoryBuffer's histories are not numeric 1-d arrays of one
            length.
    """
    try:
        return _Finisher(max_bytes).visit(obj)
    except RecursionError:
        raise RefusedCall(
            'builtins.list', 'its containers are nested too deep'
        ) from None


class _Finisher:
    def __init__(self, max_bytes: Optional[int]):
        self.max_bytes, self.done = max_bytes, {}

    def visit(self, obj):
        from mmengine.logging.history_buffer import HistoryBuffer

        key = id(obj)
        if key in self.done:
            return self.done[key]
        self.done[key] = obj  # cycles through lists and dicts end here
        if isinstance(obj, (NumpyArray, NumpyDType)):
            array = isinstance(obj, NumpyArray)
            new = obj.array if array else obj.dtype
            if new is None:
                name = _multiarray('_reconstruct') if array else obj.NAME
                raise RefusedCall(name, 'an object without its state')
        elif isinstance(obj, torch.Tensor):
            self.check_tensor(obj)
            new = obj
        elif isinstance(obj, dict):
            for k in list(obj):
                obj[k] = self.visit(obj[k])
            new = obj
        elif isinstance(obj, list):
            obj[:] = [self.visit(v) for v in obj]
            new = obj
        elif isinstance(obj, (tuple, set, frozenset)):
            items = [self.visit(v) for v in obj]
            same = all(a is b for a, b in zip(items, obj))
            new = obj if same else type(obj)(items)
        elif isinstance(obj, HistoryBuffer):
            for k, v in list(vars(obj).items()):
                setattr(obj, k, self.visit(v))
            check_history_buffer(obj)
            new = obj
        else:
            new = obj
        self.done[key] = new
        return new

    def check_tensor(self, tensor: torch.Tensor) -> None:
        if self.max_bytes is None or tensor.layout != torch.strided:
            return
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > self.max_bytes:
            raise RefusedCall(
                'torch._utils._rebuild_tensor_v2',
                f'a tensor of shape {tuple(tensor.shape)} and strides '
                f'{tensor.stride()} views {nbytes} bytes, more than the '
                f'whole file ({self.max_bytes} bytes)',
            )


def check_history_buffer(buffer) -> None:
    """Refuse a HistoryBuffer whose histories are not numeric 1-d arrays of
    one length (mmengine's own invariant, which its statistics rely on)."""
    import numpy as np

    logs = vars(buffer).get('_log_history')
    counts = vars(buffer).get('_count_history')
    name = 'mmengine.logging.history_buffer.HistoryBuffer'
    for what, value in (('log', logs), ('count', counts)):
        if not (
            isinstance(value, np.ndarray)
            and value.ndim == 1
            and value.dtype.kind in 'biuf'
        ):
            raise RefusedCall(
                name, f'its {what} history is {_short(value)}, not numbers'
            )
    if len(logs) != len(counts):
        raise RefusedCall(
            name,
            f'its log and count histories differ in length ({len(logs)} '
            f'and {len(counts)})',
        )
