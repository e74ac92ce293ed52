"""System figures for the training log: model FLOPs per token, peak device FLOP/s, MFU, memory.

Two token counts matter once windows are packed: real tokens (non-pad targets: the training signal)
and positions (every sequence position the model computes, prefix slots and padding included: the
device's work). Both rates, their ratio (the useful-token fraction) and an MFU on each are logged.
"""

from __future__ import annotations

import resource
import time

import torch
import torch.distributed as dist

from ehrfm.model.config import ModelConfig

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment; override with scaling.peak_tflops.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12}


def flops_per_token(cfg: ModelConfig, trainable_params: int, total_params: int) -> float:
    """Training FLOPs per token: 2N forward over all weights, 4N backward over trainable ones (a
    frozen base still needs activation gradients: ~2N), plus causal attention scores."""
    frozen = total_params - trainable_params
    dense = 6 * trainable_params + 4 * frozen
    length = cfg.context + cfg.prefix_length
    attention = 6 * cfg.layers * cfg.hidden * length  # QK^T and AV, forward+backward, causal half
    return float(dense + attention)


def mfu_figures(flops_token: float, metrics: dict[str, float], peak_total: float) -> dict[str, float]:
    """MFU counted on real tokens (model FLOPs the training signal needed) and on positions (FLOPs the
    device ran, padding included), against the peak of all workers together."""
    return {
        "mfu_real_tokens": flops_token * metrics["tokens_per_s"] / peak_total,
        "mfu_positions": flops_token * metrics["positions_per_s"] / peak_total,
    }


def peak_flops(device: torch.device, configured_tflops: float | None) -> float | None:
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, value in PEAK_BF16_FLOPS.items():
        if fragment in name:
            return value
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory on GPU, peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def model_state_mb(engine) -> float:
    """MB of tensors this rank holds for the model: parameters (its ZeRO-3 shard), gradients and
    everything the (DeepSpeed-wrapped) optimiser keeps, each storage counted once. Activations are
    not included, so on any device this shows what ZeRO partitions."""
    seen: set[int] = set()
    total = 0

    def visit(obj, depth: int = 0) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if obj.device.type == "meta" or obj.numel() == 0:
                return
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif depth < 4 and isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item, depth + 1)
        elif depth < 4 and isinstance(obj, dict):
            for item in obj.values():
                visit(item, depth + 1)

    for param in engine.module.parameters():
        visit(param.ds_tensor if hasattr(param, "ds_tensor") else param.data)
        visit(param.grad)
    optimizer = engine.optimizer
    for holder in (optimizer, getattr(optimizer, "optimizer", None)):
        if holder is None:
            continue
        visit(getattr(holder, "state", {}))
        visit(vars(holder))
    return total / 2**20


class WindowMeter:
    """Loss and token counts between two log steps, kept on the device so steps never sync the host
    (positions come from batch shapes, known on the host).

    `summary` all-reduces them once (the only host sync), and leaves out time spent in validation
    and checkpoints (`exclude`) so tokens/s is training speed.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.loss_sum = torch.zeros((), device=device)
        self.tokens = torch.zeros((), dtype=torch.long, device=device)
        self._reset()

    def _reset(self) -> None:
        self.loss_sum.zero_()
        self.tokens.zero_()
        self.micro_steps, self.positions, self.started, self.excluded = 0, 0, time.perf_counter(), 0.0

    def add(self, loss: torch.Tensor, real_tokens: torch.Tensor, positions: int) -> None:
        self.loss_sum += loss.detach()
        self.tokens += real_tokens
        self.positions += positions
        self.micro_steps += 1

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds

    def summary(self, engine, grad_accum: int) -> dict[str, float]:
        """Figures of the window over all ranks: train loss, real tokens/s, positions/s, useful-token
        fraction, step time, memory per worker."""
        figures = torch.stack(
            [
                self.loss_sum.double(),
                self.tokens.double(),
                torch.tensor(float(self.micro_steps), dtype=torch.float64, device=self.device),
                torch.tensor(float(self.positions), dtype=torch.float64, device=self.device),
            ]
        )
        dist.all_reduce(figures)
        memory = torch.tensor([peak_memory_mb(self.device), model_state_mb(engine)], device=self.device)
        dist.all_reduce(memory, op=dist.ReduceOp.MAX)
        elapsed = max(time.perf_counter() - self.started - self.excluded, 1e-9)
        positions = float(figures[3])
        summary = {
            "train_loss": float(figures[0] / figures[2]),
            "window_tokens": float(figures[1]),
            "tokens_per_s": float(figures[1]) / elapsed,  # real (non-pad target) tokens
            "positions_per_s": positions / elapsed,
            "useful_token_fraction": float(figures[1]) / max(positions, 1.0),
            "step_time_s": elapsed * grad_accum / max(self.micro_steps, 1),
            "peak_memory_mb_max_worker": float(memory[0]),
            "model_state_mb_max_worker": float(memory[1]),
        }
        self._reset()
        return summary
