"""mmengine checkpoints load with torch's weights_only=True kept on, inside
the scoped allow-list the package's tools use."""

import os
import pickle

import pytest
import torch
import torch.nn as nn
from mmengine.model import BaseModel
from mmengine.runner import Runner

from mmdet_dyhead.checkpoint import mmengine_safe_globals


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
    with mmengine_safe_globals():
        loaded = torch.load(ckpt, map_location='cpu', weights_only=True)
        assert 'message_hub' in loaded and 'optimizer' in loaded
        runner = _runner(tmp_path / 'b', resume=True, load_from=str(ckpt))
        runner._train_loop = runner.build_train_loop(runner._train_loop)
        runner.load_or_resume()
    assert runner.iter == 2 and runner.epoch == 1
    hist = runner.message_hub.get_scalar('train/loss')
    assert len(hist.data[0]) > 0
    # the allow-list ends with the block
    with pytest.raises(pickle.UnpicklingError, match='HistoryBuffer'):
        torch.load(ckpt, map_location='cpu', weights_only=True)


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


class _AttrProbe:
    def __reduce__(self):
        # getattr(HistoryBuffer, '__init__') is not a statistics method.
        from mmengine.logging.history_buffer import HistoryBuffer

        return (getattr, (HistoryBuffer, '__init__'))


def test_getattr_is_limited_to_history_buffer_statistics(tmp_path):
    path = tmp_path / 'probe.pth'
    torch.save({'x': _AttrProbe()}, path)
    with (
        mmengine_safe_globals(),
        pytest.raises(
            pickle.UnpicklingError, match='HistoryBuffer statistics'
        ),
    ):
        torch.load(path, weights_only=True)
