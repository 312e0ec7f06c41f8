"""mmengine checkpoints load with torch's weights_only=True kept on, inside
the scoped allow-list the package's tools use; allow-listed names called
with hostile arguments are refused with the file and the reason."""

import collections
import os
import pickle
import re
import struct
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.runner import Runner
from mmengine.runner.checkpoint import CheckpointLoader

from mmdet_dyhead.checkpoint import (
    CheckpointError,
    checkpoint_loaders,
    load,
    mmengine_safe_globals,
)

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct


class ToyModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, inputs, labels=None, mode='tensor'):
        inputs = torch.stack(inputs) if isinstance(inputs, list) else inputs
        out = self.linear(inputs)
        if mode == 'loss':
            return dict(
                loss=(out.squeeze(1) - torch.stack(labels)).square().mean()
            )
        return out


class ToyDataset(torch.utils.data.Dataset):
    metainfo = dict(classes=('a', 'b'))

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return dict(
            inputs=torch.full((2,), float(i)), labels=torch.tensor(float(i))
        )


def _runner(work_dir, **kw):
    return Runner(
        model=ToyModel(),
        work_dir=str(work_dir),
        train_dataloader=dict(
            dataset=ToyDataset(),
            sampler=dict(type='DefaultSampler', shuffle=True),
            batch_size=4,
            num_workers=0,
        ),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9)),
        param_scheduler=dict(type='MultiStepLR', milestones=[1]),
        train_cfg=dict(by_epoch=True, max_epochs=1),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1)),
        experiment_name=f'toy_{os.getpid()}',
        **kw,
    )


def test_runner_checkpoint_loads_weights_only_and_resumes(tmp_path):
    _runner(tmp_path / 'a').train()
    ckpt = tmp_path / 'a' / 'epoch_1.pth'
    loaded = load(str(ckpt))
    # the file is our own: an unrestricted load is the reference
    trusted = torch.load(ckpt, map_location='cpu', weights_only=False)
    assert_same(loaded['message_hub'], trusted['message_hub'])
    with checkpoint_loaders():
        runner = _runner(tmp_path / 'b', resume=True, load_from=str(ckpt))
        runner._train_loop = runner.build_train_loop(runner._train_loop)
        runner.load_or_resume()
    assert runner.iter == 2 and runner.epoch == 1
    hist = runner.message_hub.get_scalar('train/loss')
    assert isinstance(hist.data[0], np.ndarray) and len(hist.data[0]) > 0
    assert (
        hist.mean()
        == trusted['message_hub']['log_scalars']['train/loss'].mean()
    )
    # the allow-list is scoped: torch alone refuses the file
    with pytest.raises(pickle.UnpicklingError, match='HistoryBuffer'):
        torch.load(ckpt, map_location='cpu', weights_only=True)


def assert_same(a, b):
    """Equal values of equal types, numpy arrays to the dtype and byte
    order."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, HistoryBuffer):
        assert_same(vars(a), vars(b))
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and a.dtype.str == b.dtype.str
        assert a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_numpy_values_load_as_numpy_writes_them(tmp_path):
    buffer = HistoryBuffer()
    for value in (0.5, 2.0, 1.25):
        buffer.update(value)
    data = {
        'buffer': buffer,
        'float64': np.arange(6, dtype=np.float64).reshape(2, 3),
        'fortran': np.asfortranarray(np.arange(6, dtype='>i4').reshape(2, 3)),
        'empty': np.zeros((0, 4), np.float32),
        'bool': np.array([True, False]),
        'text': np.array(['ab', 'cde']),
        'scalars': [np.float32(1.5), np.int64(-3), np.bool_(True)],
        'zero_d': np.array(7, dtype=np.uint8),
        'dtype': np.dtype('>f2'),
        'shared': (np.ones(2),) * 2,
    }
    path = tmp_path / 'numpy.pth'
    torch.save(data, path)
    loaded = load(str(path))
    assert_same(loaded, torch.load(path, weights_only=False))
    assert loaded['shared'][0] is loaded['shared'][1]
    assert loaded['buffer'].mean() == buffer.mean()


class _Exploit:
    def __reduce__(self):
        return (os.system, ('echo pwned',))


def test_a_pickle_that_runs_code_is_still_refused(tmp_path):
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        pickle.dump({'state_dict': {}, 'x': _Exploit()}, f)
    with mmengine_safe_globals(), pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD' not in os.environ


# ----------------------------------------------------------------------------
# allow-listed names called with hostile arguments: refused by the loader a
# user reaches, naming the file and the reason, before anything the file
# asks for is allocated
# ----------------------------------------------------------------------------
class _Call:
    """Unpickles as ``func(*args)``, then ``BUILD`` with ``state``."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        if self.state is None:
            return (self.func, self.args)
        return (self.func, self.args, self.state)


def _storage(n=4):
    with warnings.catch_warnings():  # TypedStorage is what torch pickles
        warnings.simplefilter('ignore')
        return torch.zeros(n).storage()


def _uneven_buffer():
    buffer = HistoryBuffer([1.0, 2.0], [1, 1])
    buffer._count_history = np.array([1])  # as a crafted state sets it
    return buffer


def _payloads():
    array, dtype = np.ndarray, np.dtype
    tensor = torch._utils._rebuild_tensor_v2
    hooks = collections.OrderedDict()
    return {
        # numpy would allocate 909 TiB for this shape
        'huge _reconstruct': (
            _Call(_reconstruct, (array, (10**15,), b'b')),
            r'refused global numpy.(_core|core).multiarray._reconstruct: '
            r'an empty array of shape \(1000000000000000,\) needs '
            r'1000000000000000 bytes, more than the file holds',
        ),
        'shape beyond the data': (
            _Call(
                _reconstruct,
                (array, (0,), b'b'),
                (1, (10**12,), dtype('u1'), False, b'x'),
            ),
            r'shape \(1000000000000,\) and dtype uint8 needs '
            r'1000000000000 bytes of data, the pickle gives 1',
        ),
        'object array': (
            _Call(_reconstruct, (array, (3,), b'O')),
            r'dtype object holds Python objects',
        ),
        'dtype flags': (
            _Call(
                dtype,
                ('f8', False, True),
                (3, '<', None, None, None, -1, -1, 63),
            ),
            r'refused global numpy.dtype: the state .* is not one numpy '
            r'writes for float64',
        ),
        'history lengths (call)': (
            _Call(HistoryBuffer, ([1.0, 2.0], [1])),
            r'refused global .*HistoryBuffer.__init__: the pickle calls it '
            r'with arguments it cannot use \(AssertionError: The lengths',
        ),
        'history lengths (state)': (
            _uneven_buffer(),
            r'HistoryBuffer: its log and count histories differ in length '
            r'\(2 and 1\)',
        ),
        'tensor: wrong types': (
            _Call(tensor, (_storage(), 0, 'abc', (1,), False, hooks)),
            r'refused global torch._utils._rebuild_tensor_v2: the pickle '
            r'calls it with arguments it cannot use \(TypeError',
        ),
        'tensor: size beyond storage': (
            _Call(tensor, (_storage(), 0, (100,), (1,), False, hooks)),
            r'refused global torch._utils._rebuild_tensor_v2: .*'
            r'RuntimeError: .*storage',
        ),
        'tensor: zero strides': (
            _Call(
                tensor, (_storage(), 0, (2**20, 2**20), (0, 0), False, hooks)
            ),
            r'a tensor of shape \(1048576, 1048576\) and strides \(0, 0\) '
            r'views 4398046511104 bytes, more than the whole file',
        ),
        'getattr': (
            _Call(getattr, (HistoryBuffer, '__init__')),
            r'refused global builtins.getattr: the pickle asks for getattr\('
            r".*HistoryBuffer'>, '__init__'\)",
        ),
    }


PAYLOADS = _payloads()


@pytest.mark.parametrize('name', list(PAYLOADS))
def test_hostile_arguments_are_refused_naming_file_and_reason(
    tmp_path, monkeypatch, name
):
    payload, reason = PAYLOADS[name]
    path = tmp_path / 'crafted.pth'
    torch.save({'state_dict': {'w': torch.ones(2)}, 'x': payload}, path)
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    with pytest.raises(CheckpointError) as err:
        load(str(path))
    text = str(err.value)
    assert text.startswith(f'Refused {path}: '), text
    assert re.search(reason, text), text
    assert 'weights_only=False' not in text and 'truncated' not in text
    # mmengine's loader reaches the same diagnosis inside the tools' scope
    with checkpoint_loaders(), pytest.raises(CheckpointError) as err:
        CheckpointLoader.load_checkpoint(str(path))
    assert re.search(reason, str(err.value))


def test_a_legacy_file_asking_for_more_storage_than_it_holds_is_refused(
    tmp_path,
):
    """torch's legacy format allocates each storage at the size its pickle
    states before reading the data."""
    path = tmp_path / 'legacy.pth'
    torch.save(
        {'w': torch.arange(4.0)}, path, _use_new_zipfile_serialization=False
    )
    data = path.read_bytes()
    # ('storage', FloatStorage, '0', 'cpu', 4, None): 4 -> 2**31 - 1
    at = data.index(b'K\x04', data.index(b'cpu'))
    big = struct.pack('<i', 2**31 - 1)
    path.write_bytes(data[:at] + b'J' + big + data[at + 2 :])
    with pytest.raises(CheckpointError) as err:
        load(str(path))
    text = str(err.value)
    assert text.startswith(f'Refused {path}: its pickle asks for ')
    assert f'{(2**31 - 1) * 4} bytes of tensor storage, more than' in text
    assert 'weights_only=False' not in text
