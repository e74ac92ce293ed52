"""The fused linear + cross-entropy: equal to the plain loss (values and gradients, PAD targets,
any chunk size, frozen weight, bf16), never an [M, V] tensor, and the model's loss_chunk path."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ehrfm.constants import PAD_ID
from ehrfm.model import EHRDecoder, ModelConfig
from ehrfm.model.loss import fused_linear_cross_entropy, plain_linear_cross_entropy

M, H, V = 37, 16, 23


def operands(seed: int = 0, dtype=torch.float32, pad_every: int = 4):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(M, H, generator=gen).to(dtype).requires_grad_()
    weight = (0.3 * torch.randn(V, H, generator=gen)).to(dtype).requires_grad_()
    targets = torch.randint(1, V, (M,), generator=gen)
    targets[::pad_every] = PAD_ID
    return hidden, weight, targets


def loss_and_grads(fn, hidden, weight, targets, **kw):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, targets, **kw)
    loss.backward(torch.tensor(1.7))  # a non-unit upstream gradient must scale the stored ones
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("chunk", [1, 5, 8, 37, 100])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_equals_plain_values_and_gradients(chunk, reduction):
    hidden, weight, targets = operands()
    want = loss_and_grads(plain_linear_cross_entropy, hidden, weight, targets, reduction=reduction)
    got = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, chunk=chunk, reduction=reduction)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert (hidden.grad[targets == PAD_ID] == 0).all() and (hidden.grad[targets != PAD_ID] != 0).any()


def test_frozen_weight_gets_no_gradient_and_hidden_the_same_one():
    hidden, weight, targets = operands(seed=1)
    want = loss_and_grads(plain_linear_cross_entropy, hidden, weight, targets)
    weight.requires_grad_(False)
    hidden.grad = weight.grad = None
    loss = fused_linear_cross_entropy(hidden, weight, targets, chunk=6)
    loss.backward(torch.tensor(1.7))
    assert weight.grad is None
    torch.testing.assert_close(loss.detach(), want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden.grad, want[1], atol=1e-5, rtol=1e-5)


def test_no_real_target_gives_zero_loss_and_zero_gradients():
    hidden, weight, targets = operands()
    loss = fused_linear_cross_entropy(hidden, weight, torch.full_like(targets, PAD_ID), chunk=4)
    loss.backward()
    assert loss.item() == 0.0
    assert hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


def test_bf16_operands_give_bf16_gradients_close_to_fp32():
    hidden, weight, targets = operands(seed=2)
    want = loss_and_grads(plain_linear_cross_entropy, hidden, weight, targets)
    h16 = hidden.detach().bfloat16().requires_grad_()
    w16 = weight.detach().bfloat16().requires_grad_()
    loss, gh, gw = loss_and_grads(fused_linear_cross_entropy, h16, w16, targets, chunk=8)
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(loss, want[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gh.float(), want[1], atol=2e-2, rtol=5e-2)
    torch.testing.assert_close(gw.float(), want[2], atol=2e-2, rtol=5e-2)
    # fp32 weights under bf16 autocast: the weight's gradient comes back in fp32
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, targets, chunk=8)
    loss.backward(torch.tensor(1.7))
    assert weight.grad.dtype == torch.float32
    torch.testing.assert_close(weight.grad, want[2], atol=2e-2, rtol=5e-2)


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_fused_loss_never_builds_an_m_by_v_tensor():
    rows, width, vocab, chunk = 1024, 4, 512, 64
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, width, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, width, generator=gen, requires_grad=True)
    targets = torch.randint(1, vocab, (rows,), generator=gen)
    sizes = {}
    for name, fn, kw in (
        ("plain", plain_linear_cross_entropy, {}),
        ("fused", fused_linear_cross_entropy, {"chunk": chunk}),
    ):
        with LargestOutput() as probe:
            fn(hidden, weight, targets, **kw).backward()
        sizes[name] = probe.largest
    assert sizes["plain"] >= rows * vocab  # the probe sees the full logits where they exist
    assert sizes["fused"] <= chunk * vocab  # peak ~ chunk x V: 16x less than M x V here


@pytest.mark.parametrize("fusion", ["none", "prefix"])
def test_model_loss_chunk_gives_the_plain_loss_without_logits(fusion):
    cfg = ModelConfig(
        vocab_size=50, num_pgs=4, hidden=32, layers=2, heads=2, context=16, fusion=fusion, prs_tokens=3, prs_hidden=16
    )
    torch.manual_seed(0)
    model = EHRDecoder(cfg)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, 50, (3, 16), generator=gen)
    targets = torch.randint(4, 50, (3, 16), generator=gen)
    targets[1, 9:] = PAD_ID
    ages = torch.cumsum(torch.randint(0, 30, (3, 16), generator=gen), 1)
    prs, has_prs = torch.randn(3, 4, generator=gen), torch.tensor([True, False, True])
    results = {}
    for chunk in (0, 7):
        model.zero_grad()
        logits, loss = model(tokens, ages, prs, has_prs, targets=targets, loss_chunk=chunk)
        loss.backward()
        results[chunk] = (logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert results[0][0] is not None and results[7][0] is None
    torch.testing.assert_close(results[7][1], results[0][1], atol=1e-5, rtol=1e-5)
    for name, grad in results[0][2].items():
        torch.testing.assert_close(results[7][2][name], grad, atol=1e-5, rtol=1e-5, msg=name)
    _, total = model(tokens, ages, prs, has_prs, targets=targets, loss_chunk=7, reduction="sum")
    torch.testing.assert_close(total, results[0][1] * (targets != PAD_ID).sum(), atol=1e-4, rtol=1e-5)
