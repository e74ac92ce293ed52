"""Packed rows (several persons per row, document masking): the same losses and gradients as the
persons run one per row, no attention across persons (self or PRS cross-attention), and the
FlexAttention mask equal to the dense SDPA reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ehrfm.constants import PAD_ID
from ehrfm.model import EHRDecoder, ModelConfig
from ehrfm.model.packing import DocumentMask, dense_document_mask

VOCAB, K, CONTEXT = 50, 4, 12
WINDOW_LENGTHS = (13, 5, 9, 3, 7, 2, 11)  # context + 1 tokens at most, as the windowing cuts them


def tiny(fusion: str) -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB,
        num_pgs=K,
        hidden=32,
        layers=2,
        heads=2,
        context=CONTEXT,
        fusion=fusion,
        prs_tokens=3,
        prs_hidden=16,
        cross_every=1,
    )


def model_for(fusion: str) -> EHRDecoder:
    torch.manual_seed(0)
    model = EHRDecoder(tiny(fusion)).eval()
    with torch.no_grad():  # open the cross gates and give the missing-PRS tokens a value
        for name, param in model.named_parameters():
            if name.endswith("cross.gate"):
                param.fill_(0.7)
            if name.endswith("missing"):
                param.normal_()
    return model


def windows(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for w in WINDOW_LENGTHS:
        tokens = torch.randint(4, VOCAB, (w,), generator=gen)
        ages = 15_000 + torch.cumsum(torch.randint(0, 90, (w,), generator=gen), 0).int()
        out.append((tokens, ages))
    prs = torch.randn(len(out), K, generator=gen)
    has_prs = torch.tensor([i % 3 != 1 for i in range(len(out))])
    return out, prs, has_prs


def unpacked(wins):
    """Today's batch: one person per row, inputs/targets right-padded to the context."""
    batch = len(wins)
    tokens = torch.full((batch, CONTEXT), PAD_ID)
    targets = torch.full((batch, CONTEXT), PAD_ID)
    ages = torch.zeros(batch, CONTEXT, dtype=torch.int32)
    for i, (tok, age) in enumerate(wins):
        n = len(tok) - 1
        tokens[i, :n], targets[i, :n], ages[i, :n] = tok[:-1], tok[1:], age[:-1]
    return tokens, ages, targets


def packed(wins, prefix: int):
    """The agreed packed layout: first-fit-decreasing into rows of prefix + context positions."""
    length = prefix + CONTEXT
    sizes = [prefix + len(tok) - 1 for tok, _ in wins]
    rows: list[list[int]] = []  # persons per row
    free: list[int] = []
    for person in sorted(range(len(wins)), key=lambda i: (-sizes[i], i)):
        row = next((r for r, room in enumerate(free) if room >= sizes[person]), None)
        if row is None:
            rows.append([])
            free.append(length)
            row = len(rows) - 1
        rows[row].append(person)
        free[row] -= sizes[person]
    shape = (len(rows), length)
    out = {
        "tokens": torch.full(shape, PAD_ID),
        "targets": torch.full(shape, PAD_ID),
        "ages": torch.zeros(shape, dtype=torch.int32),
        "segment": torch.full(shape, -1),
        "positions": torch.zeros(shape, dtype=torch.long),
        "prefix_slot": torch.full(shape, -1),
    }
    for r, persons in enumerate(rows):
        at = 0
        for person in persons:
            tok, age = wins[person]
            n = len(tok) - 1
            seg = slice(at, at + prefix + n)
            events = slice(at + prefix, at + prefix + n)
            out["segment"][r, seg] = person
            out["positions"][r, seg] = torch.arange(prefix + n)
            out["prefix_slot"][r, at : at + prefix] = torch.arange(prefix)
            out["tokens"][r, events], out["targets"][r, events], out["ages"][r, events] = tok[:-1], tok[1:], age[:-1]
            at += prefix + n
    return out


def token_losses(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=PAD_ID, reduction="none").view(
        targets.shape
    )


def per_person_packed(logits, batch):
    losses = token_losses(logits, batch["targets"])
    n = int(batch["segment"].max()) + 1
    return torch.zeros(n).index_add(0, batch["segment"].clamp(min=0).flatten(), losses.flatten())


def followed_in_its_row(segment, person) -> bool:
    """Another person's segment comes after this one in its row (causal leakage would reach it)."""
    row = int((segment == person).nonzero()[0, 0])
    last = int((segment[row] == person).nonzero().max())
    return bool((segment[row, last + 1 :] >= 0).any())


def call_packed(model, batch, prs, has_prs, **kw):
    return model(
        batch["tokens"],
        batch["ages"],
        prs,
        has_prs,
        segment=batch["segment"],
        positions=batch["positions"],
        prefix_slot=batch["prefix_slot"],
        **kw,
    )


@pytest.mark.parametrize("fusion", ["none", "prefix", "cross"])
def test_packed_batch_gives_the_unpacked_losses_and_gradients(fusion):
    wins, prs, has_prs = windows()
    model = model_for(fusion)
    batch = packed(wins, model.cfg.prefix_length)
    assert batch["tokens"].shape[0] < len(wins)  # several persons share a row
    tokens, ages, targets = unpacked(wins)

    logits, loss = model(tokens, ages, prs, has_prs, targets=targets, reduction="sum")
    expected = token_losses(logits, targets).sum(dim=1)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    logits_p, loss_p = call_packed(model, batch, prs, has_prs, targets=batch["targets"], reduction="sum")
    got = per_person_packed(logits_p, batch)
    loss_p.backward()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_p, loss, atol=1e-5, rtol=1e-5)
    assert expected.min() > 0
    for name, param in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad, grads[name], atol=1e-5, rtol=1e-5, msg=name)
    if fusion != "none":  # the PRS path is exercised (its gradients are compared above)
        assert grads["prs_encoder.fc_in.weight"].abs().sum() > 0

    # mean reduction: per real target, as unpacked
    _, mean_p = call_packed(model, batch, prs, has_prs, targets=batch["targets"])
    torch.testing.assert_close(mean_p, loss / (targets != PAD_ID).sum(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fusion", ["none", "prefix", "cross"])
def test_perturbing_one_person_changes_no_other_persons_logits(fusion):
    wins, prs, has_prs = windows(seed=1)
    model = model_for(fusion)
    batch = packed(wins, model.cfg.prefix_length)
    with torch.no_grad():
        before, _ = call_packed(model, batch, prs, has_prs)
        victim = next(p for p in range(len(wins)) if followed_in_its_row(batch["segment"], p))
        mine = (batch["segment"] == victim) & (batch["tokens"] != PAD_ID)
        changed = dict(batch, tokens=torch.where(mine, (batch["tokens"] + 7) % (VOCAB - 4) + 4, batch["tokens"]))
        changed["ages"] = torch.where(mine, batch["ages"] + 400, batch["ages"])
        other_prs = prs.clone()
        other_prs[victim] += 3.0
        other_has = has_prs.clone()
        other_has[victim] = True
        after, _ = call_packed(model, changed, other_prs, other_has)
    others = (batch["segment"] >= 0) & (batch["segment"] != victim)
    torch.testing.assert_close(after[others], before[others], atol=1e-6, rtol=0)
    assert (after[batch["segment"] == victim] - before[batch["segment"] == victim]).abs().max() > 1e-3
    assert torch.isfinite(after).all()  # padding rows included


def test_prs_alone_reaches_only_its_own_person_in_cross_fusion():
    wins, prs, has_prs = windows(seed=2)
    model = model_for("cross")
    batch = packed(wins, 0)
    with torch.no_grad():
        before, _ = call_packed(model, batch, prs, has_prs)
        moved = prs.clone()
        moved[0] += 5.0
        after, _ = call_packed(model, batch, moved, has_prs.clone().fill_(True))
        base, _ = call_packed(model, batch, prs, has_prs.clone().fill_(True))
    mine = batch["segment"] == 0
    others = batch["segment"] > 0
    torch.testing.assert_close(after[others], base[others], atol=1e-6, rtol=0)
    assert (after[mine] - base[mine]).abs().max() > 1e-3
    assert (before[mine] - base[mine]).abs().max() == 0  # person 0 has a PRS in both


def test_dense_mask_is_causal_within_segments_and_padding_sees_itself():
    segment = torch.tensor([[0, 0, 1, 1, 1, -1]])
    mask = dense_document_mask(segment)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def _flex_runs_on_cpu() -> str | None:
    try:
        segment = torch.zeros(1, 4, dtype=torch.long)
        q = torch.randn(1, 1, 4, 16)
        DocumentMask.build(segment, "flex-eager").attend(q, q, q)
    except Exception as err:  # noqa: BLE001 - any failure means: this torch has no CPU flex path
        return f"FlexAttention does not run on CPU in this torch ({type(err).__name__})"
    return None


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_attention_equals_the_sdpa_reference_on_cpu():
    reason = _flex_runs_on_cpu()
    if reason:
        pytest.skip(reason)
    wins, prs, has_prs = windows(seed=3)
    model = model_for("prefix")
    batch = packed(wins, model.cfg.prefix_length)
    with torch.no_grad():
        reference, _ = call_packed(model, batch, prs, has_prs)
        model.attention_backend = "flex-eager"  # uncompiled: compiling on CPU would cost minutes in CI
        flex, _ = call_packed(model, batch, prs, has_prs)
    valid = batch["segment"] >= 0
    torch.testing.assert_close(flex[valid], reference[valid], atol=1e-5, rtol=1e-5)


class CopyShapes(TorchDispatchMode):
    """Shapes of every dtype conversion (`aten._to_copy`) an op sequence makes."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default:
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_forward_rotates_q_and_k_without_dtype_copies(autocast):
    wins, prs, has_prs = windows(seed=4)
    model = model_for("none")
    if not autocast:
        model = model.to(torch.bfloat16)
    batch = packed(wins, 0)
    tokens, ages, targets = unpacked(wins)
    heads, head_dim = model.cfg.heads, model.cfg.head_dim
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for rows, length, run in (
            (tokens.shape[0], CONTEXT, lambda: model(tokens, ages, targets=targets)),
            (batch["tokens"].shape[0], CONTEXT, lambda: call_packed(model, batch, prs, has_prs)),
        ):
            with CopyShapes() as probe:
                logits, _ = run()
            assert logits.dtype == torch.bfloat16
            assert (rows, heads, length, head_dim) not in probe.shapes  # q/k never go to fp32 and back
            assert probe.shapes  # the probe sees conversions (ages to fp32, at least)
