"""PretrainConfig -> the DeepSpeed config dict, the optimiser and the LR schedule it wraps.

The optimiser is a torch AdamW handed to deepspeed.initialize (fused kernels on GPU), so the
same code runs on CPU, where DeepSpeed's own fused Adam is not available; ZeRO accepts it with
`zero_allow_untested_optimizer`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ehrfm.training.config import PretrainConfig


def deepspeed_config(cfg: PretrainConfig, world_size: int) -> dict[str, Any]:
    ds = cfg.deepspeed
    overlap = cfg.scaling.use_gpu if ds.overlap_comm is None else ds.overlap_comm
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
    micro = cfg.data.batch_size
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.schedule.grad_accum,
        "train_batch_size": micro * cfg.schedule.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.bf16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # the loop logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (and embeddings), not norms, biases, gates or single vectors; trainable only."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.AdamW(
        parameter_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps, fused=cfg.scaling.use_gpu
    )


class WarmupCosine:
    """LR multiplier: linear warmup to 1, then cosine down to `min_ratio` at `total` steps."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def scheduler_factory(cfg: PretrainConfig):
    """Callable DeepSpeed applies to the optimiser it wraps (so ZeRO's param groups get the LR)."""
    schedule = WarmupCosine(cfg.optim.warmup_steps, cfg.schedule.max_steps, cfg.optim.min_lr_ratio)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
