"""Two-process CPU training through torchrun + the package's tools/train.py
(mmdet's script, mmengine's pytorch launcher; the tool starts the gloo
process group and picks the CPU DDP wrapper)."""

import os.path as osp
import re
import socket
import subprocess
import sys

import pytest
import torch

from mmdet_dyhead.engine import (
    CPUDistributedDataParallel,
    init_cpu_process_group,
)
from tests.helpers import REPO_ROOT, subprocess_env, write_train_config


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_and_save_a_loadable_checkpoint(
    tmp_path,
):
    config = write_train_config(tmp_path)
    work_dir = tmp_path / 'work'

    def torchrun():
        cmd = [
            sys.executable,
            '-m',
            'torch.distributed.run',
            '--nnodes=1',
            '--nproc_per_node=2',
            '--master_addr=127.0.0.1',
            f'--master_port={free_port()}',
            osp.join(REPO_ROOT, 'tools/train.py'),
            str(config),
            '--launcher',
            'pytorch',
            '--work-dir',
            str(work_dir),
        ]
        proc = subprocess.run(
            cmd,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=240,
        )
        return proc, proc.stdout + proc.stderr

    proc, log = torchrun()
    # One clean-clone CI run in eight saw a rank abort at start-up inside
    # torch ('terminate called without an active exception', a C++ thread
    # destroyed while joinable) before any iteration; it did not come back
    # in later runs. One retry for exactly that; any other failure, or the
    # same one twice, fails the test.
    if proc.returncode != 0 and 'terminate called without an active' in log:
        proc, log = torchrun()
    # torchrun exits 0 only if every rank did.
    assert proc.returncode == 0, log[-4000:]
    assert 'Distributed training: True' in log
    assert "type='CPUDistributedDataParallel'" in log
    assert len(re.findall(r'Iter\(train\) \[3/3\]', log)) >= 1, log[-3000:]

    from mmdet.apis import init_detector
    from mmengine.config import Config

    ckpt = work_dir / 'iter_3.pth'
    assert ckpt.is_file()
    from mmdet_dyhead.checkpoint import mmengine_safe_globals

    with mmengine_safe_globals():  # weights_only default, scoped allow-list
        loaded = torch.load(ckpt, map_location='cpu')
    assert loaded['meta']['iter'] == 3
    # Strict load into the same architecture: no key or shape mismatch.
    # palette given: this config has no test_dataloader to read one from
    cfg = Config.fromfile(str(config))
    model = init_detector(cfg, palette='random', device='cpu')
    model.load_state_dict(loaded['state_dict'], strict=True)
    # DDP wrapped the model, but the saved keys are the plain model's.
    assert not any(k.startswith('module.') for k in loaded['state_dict'])


def test_nccl_on_cpu_explains_the_gloo_setting(monkeypatch):
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '1')
    with pytest.raises(RuntimeError, match='env_cfg.dist_cfg.backend=gloo'):
        init_cpu_process_group('nccl')


def test_without_torchrun_variables_the_launcher_says_so(monkeypatch):
    for key in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match='torchrun --nproc_per_node'):
        init_cpu_process_group('gloo')


def test_cpu_ddp_accepts_mmengines_device_ids_and_syncs_gradients(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip('a process group already exists in this process')
    dist.init_process_group(
        'gloo', init_method=f'file://{tmp_path}/pg', rank=0, world_size=1
    )
    try:
        from mmengine.model import BaseModel

        class Tiny(BaseModel):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(3, 1)

            def forward(self, x, mode='tensor'):
                return self.fc(x)

        # mmengine passes the local rank as device_ids even on CPU; plain
        # DDP refuses that for a CPU module.
        with pytest.raises(ValueError, match='device_ids'):
            torch.nn.parallel.DistributedDataParallel(Tiny(), device_ids=[0])
        from mmengine.registry import MODEL_WRAPPERS

        model = MODEL_WRAPPERS.build(
            dict(
                type='CPUDistributedDataParallel',
                module=Tiny(),
                device_ids=[0],
            )
        )
        assert isinstance(model, CPUDistributedDataParallel)
        model(torch.ones(2, 3)).sum().backward()
        assert torch.allclose(
            model.module.fc.weight.grad, torch.full((1, 3), 2.0)
        )
    finally:
        dist.destroy_process_group()
