"""The one training engine, shared by pretraining and fine-tuning: DeepSpeed ZeRO applied on top of a
plain `nn.Module` (model code knows nothing of parallelism), with one parameter-group builder, one
optimiser, one LR schedule, and the package's only DeepSpeed initialisation (`initialize_engine`).

A job describes itself with an `EngineSpec` (ZeRO section, micro-batch, accumulation, clipping,
precision) and names which modules train at which learning rate; DeepSpeed then does the gradient
reduction, clipping, precision and optimiser partitioning for both.

The optimiser is a torch AdamW (fused kernels on GPU), so the same code runs on CPU, where
DeepSpeed's own fused Adam is not available; ZeRO accepts it with `zero_allow_untested_optimizer`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import nn

from ehrfm.training.config import EngineSpec


class HasEngineSpec(Protocol):
    def engine_spec(self) -> EngineSpec: ...


def deepspeed_config(spec: EngineSpec | HasEngineSpec, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict of a job (an EngineSpec, or a config that gives one)."""
    if not isinstance(spec, EngineSpec):
        spec = spec.engine_spec()
    ds = spec.deepspeed
    overlap = spec.use_gpu if ds.overlap_comm is None else ds.overlap_comm
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(
            reduce_bucket_size=ds.reduce_bucket_size,
            allgather_bucket_size=ds.reduce_bucket_size,
            overlap_comm=overlap,
            contiguous_gradients=True,
        )
    if ds.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
        )
    return {
        "train_micro_batch_size_per_gpu": spec.micro_batch,
        "gradient_accumulation_steps": spec.grad_accum,
        "train_batch_size": spec.micro_batch * spec.grad_accum * world_size,
        "gradient_clipping": spec.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": spec.bf16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # the loops log; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def parameter_groups(parts: Mapping[str, tuple[nn.Module, float]], weight_decay: float) -> list[dict[str, Any]]:
    """Optimiser groups for {name: (module, lr)}: per part, decayed matrices (and embeddings) and
    undecayed vectors (norms, biases, gates), at that part's learning rate; frozen parameters left out.

    Pretraining passes one part (the model at optim.lr); fine-tuning the head at head_lr and the
    decoder at backbone_lr. Each group is named "<part>.decay" / "<part>.no_decay"; a parameter
    reachable from two parts goes to the first.
    """
    seen: set[int] = set()
    groups = []
    for name, (module, lr) in parts.items():
        decay, no_decay = [], []
        for param in module.parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (decay if param.dim() >= 2 else no_decay).append(param)
        for suffix, params, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
            if params:
                groups.append({"name": f"{name}.{suffix}", "params": params, "lr": lr, "weight_decay": wd})
    if not groups:
        raise ValueError("no trainable parameters: every parameter of the model is frozen")
    return groups


def build_optimizer(groups: list[dict[str, Any]], spec: EngineSpec) -> torch.optim.AdamW:
    """AdamW over the groups (fused kernels on GPU); each group carries its own lr."""
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=spec.betas, eps=spec.eps, fused=spec.use_gpu)


class WarmupCosine:
    """LR multiplier: linear warmup to 1, then cosine down to `min_ratio` at `total` steps.

    warmup 0 and min_ratio 1.0 is a constant LR (what fine-tuning uses).
    """

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    @classmethod
    def constant(cls) -> WarmupCosine:
        """A fresh instance each time: LambdaLR restores a checkpoint's values into it."""
        return cls(warmup=0, total=1, min_ratio=1.0)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def skip_cpu_shared_memory_kernel() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce kernel.

    Its communication backend builds that kernel (`deepspeed_shm_comm`) on first use on CPU, yet only
    DeepSpeed's inference all-reduce calls it: ZeRO's training collectives go through
    torch.distributed (gloo), with or without it. The build takes 35-95 s of both cores of a 2-core
    machine, and the cached build in ~/.cache/torch_extensions is thrown away whenever its compile line
    changes (another venv, another interpreter), so on CI and shared machines it ran several times per
    test session. Marking the kernel incompatible makes DeepSpeed fall back to torch.distributed.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def initialize_engine(
    model: nn.Module, groups: list[dict[str, Any]], spec: EngineSpec, schedule: WarmupCosine, world_size: int
):
    """(DeepSpeed engine, LR scheduler) around `model`, in train mode: ZeRO, gradient averaging and
    clipping, precision, the AdamW over `groups` and the schedule all live in the engine, so the
    loops only call engine(...), engine.backward(loss) and engine.step().

    The scheduler is built by DeepSpeed on the optimiser it wraps, so ZeRO's groups get the LR, and
    it is saved and restored with the engine's checkpoint.
    """
    import deepspeed

    if not spec.use_gpu:
        skip_cpu_shared_memory_kernel()
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=build_optimizer(groups, spec),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        config=deepspeed_config(spec, world_size),
    )
    engine.train()
    return engine, scheduler
