"""The training engine in one process (a world of one over gloo): a CPU engine steps without DeepSpeed
compiling its shared-memory all-reduce kernel, which training never calls."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ehrfm.cluster.local import free_port
from ehrfm.training.config import DeepSpeedSection, EngineSpec
from ehrfm.training.engine import WarmupCosine, initialize_engine, parameter_groups


@pytest.fixture
def world_of_one(monkeypatch, tmp_path):
    """torch.distributed's env:// rendezvous for one rank, and an empty extension cache to watch."""
    import deepspeed.comm.comm as ds_comm

    extensions = tmp_path / "torch_extensions"
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "TORCH_EXTENSIONS_DIR": str(extensions),
    }.items():
        monkeypatch.setenv(key, value)
    try:
        yield extensions
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        ds_comm.cdb = None  # DeepSpeed's backend handle: the next engine starts its own


def test_a_cpu_engine_steps_without_compiling_the_shared_memory_kernel(world_of_one):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    before = [p.detach().clone() for p in model.parameters()]
    spec = EngineSpec(
        deepspeed=DeepSpeedSection(zero_stage=2), micro_batch=4, grad_accum=1, grad_clip=1.0, use_gpu=False
    )
    groups = parameter_groups({"model": (model, 1e-2)}, weight_decay=0.0)
    engine, _ = initialize_engine(model, groups, spec, WarmupCosine.constant(), world_size=1)
    loss = engine(torch.randn(4, 6)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    after = list(engine.module.parameters())
    assert all(not torch.equal(a.detach(), b) for a, b in zip(after, before, strict=True))
    built = sorted(p.name for p in world_of_one.rglob("*")) if world_of_one.exists() else []
    assert not [name for name in built if "shm_comm" in name], built
