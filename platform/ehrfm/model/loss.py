"""Next-token loss without the [M, V] logits: a fused linear + cross-entropy, and the output head.

At a 120k vocabulary the fp32 logits of one micro-batch are gigabytes and the head + loss take
~40% of a step. `fused_linear_cross_entropy` walks the target positions in chunks: each chunk's
logits live only inside the loop, and the gradients w.r.t. the chunk's hidden states and the
weight are computed right there (softmax - one-hot), so backward only scales stored gradients
(no second head matmul, no recomputation). Peak extra memory is ~chunk x V, plus the [M, H] and
[V, H] gradients the backward needs anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ehrfm.constants import PAD_ID


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def plain_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean", ignore_index=PAD_ID
) -> torch.Tensor:
    """Reference: full logits hidden @ weight^T, fp32 cross-entropy over the non-ignored targets."""
    _check_reduction(reduction)
    logits = (hidden @ weight.t()).float()
    total = F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp(min=1)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed (or scaled) CE of hidden [M, H] @ weight [V, H]^T against targets [M] (all real),
    gradients computed in the forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, scale: float):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, rows, chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            logits = (h @ weight.t()).float()  # [c, V] fp32; the only per-chunk V-sized tensors
            target_logit = logits.gather(1, t[:, None])
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()  # one exp, in place over the logits buffer
            norm = probs.sum(dim=-1, keepdim=True)
            total += (top + norm.log() - target_logit).sum()  # log-sum-exp minus the target's logit
            if not (need_hidden or need_weight):
                continue
            # d(loss)/d(logits) = softmax - one-hot (scaled), still in the same buffer
            grad_logits = probs.mul_(scale / norm)
            grad_logits[torch.arange(t.shape[0], device=t.device), t] -= scale
            grad_logits = grad_logits.to(hidden.dtype)
            if need_hidden:
                grad_hidden[start : start + chunk] = grad_logits @ weight
            if need_weight:
                if grad_logits.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.t(), h)
                else:  # bf16/fp16 matmul (fp32 accumulation inside), summed across chunks in fp32
                    grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(
            grad_hidden if need_hidden else None, grad_weight.to(weight.dtype) if need_weight else None
        )
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_output.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None


@torch.compiler.disable  # data-dependent shapes (dropped PAD rows, chunk loop): always eager, never traced
def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    reduction: str = "mean",
    ignore_index: int = PAD_ID,
) -> torch.Tensor:
    """CE of hidden [M, H] @ weight [V, H]^T against targets [M], equal to the plain loss.

    Positions whose target is `ignore_index` are dropped before any matmul (in packed batches
    that skips the prefix slots and the padding too). Under autocast both operands are cast to
    the autocast dtype once, as `nn.Linear` would; the fp32 weight's gradient comes back in fp32.
    A frozen weight (adapter mode) gets no gradient and costs no gradient matmul.
    """
    _check_reduction(reduction)
    if chunk < 1:
        raise ValueError(f"loss chunk must be >= 1, got {chunk}")
    keep = (targets != ignore_index).nonzero().squeeze(1)
    hidden, targets = hidden.index_select(0, keep), targets.index_select(0, keep).long()
    count = keep.shape[0]
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    scale = 1.0 / max(count, 1) if reduction == "mean" else 1.0
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, scale)


class OutputHead(nn.Linear):
    """The (tied) output projection. Called with hidden states alone it gives logits, as a plain
    `nn.Linear`; with targets and `loss_chunk` > 0 it gives the fused loss instead, so the weight is
    only used inside this module's forward (ZeRO-3 gathers it exactly there)."""

    def forward(
        self, hidden: torch.Tensor, targets: torch.Tensor | None = None, loss_chunk: int = 0, reduction: str = "mean"
    ) -> torch.Tensor:
        if targets is None:
            return super().forward(hidden)
        flat, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        if loss_chunk > 0:
            return fused_linear_cross_entropy(flat, self.weight, flat_targets, loss_chunk, reduction)
        return plain_linear_cross_entropy(flat, self.weight, flat_targets, reduction)
