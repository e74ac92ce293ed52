"""The decoder on its own (plain PyTorch, no Ray/DeepSpeed): causality, PRS fusion and missing PRS,
KV-cache generation, adapter mode, checkpoint files, and the size of the reference design."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from ehrfm.constants import PAD_ID
from ehrfm.model import ClassificationHead, EHRDecoder, ModelConfig, load_model, save_model_files
from ehrfm.model.io import load_state_dict

VOCAB, K = 50, 6


def tiny(fusion: str = "none", **changes) -> ModelConfig:
    base = dict(
        vocab_size=VOCAB,
        num_pgs=K,
        hidden=32,
        layers=4,
        heads=4,
        context=64,
        fusion=fusion,
        prs_tokens=3,
        prs_hidden=16,
        cross_every=2,
    )
    base.update(changes)
    return ModelConfig(**base)


def inputs(batch: int = 3, length: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, VOCAB, (batch, length), generator=gen)
    ages = 20_000 + torch.cumsum(torch.randint(0, 60, (batch, length), generator=gen), dim=1)
    prs = torch.randn(batch, K, generator=gen)
    has_prs = torch.tensor([True, False, True][:batch] + [True] * max(0, batch - 3))
    return tokens, ages, prs, has_prs


def opened_gates(model: EHRDecoder) -> EHRDecoder:
    """Cross gates start at 0 (no effect); open them so tests can see the cross path work."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("cross.gate"):
                param.fill_(0.7)
    return model


@pytest.mark.parametrize("fusion", ["none", "prefix", "cross"])
def test_future_tokens_do_not_change_past_logits(fusion):
    torch.manual_seed(0)
    model = opened_gates(EHRDecoder(tiny(fusion))).eval()
    tokens, ages, prs, has_prs = inputs()
    logits, _ = model(tokens, ages, prs, has_prs)
    assert logits.shape == (3, 12, VOCAB)  # prefix positions are not part of the output
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 5) % VOCAB
    logits_changed, _ = model(changed, ages, prs, has_prs)
    torch.testing.assert_close(logits[:, :7], logits_changed[:, :7])
    assert (logits[:, 7:] - logits_changed[:, 7:]).abs().max() > 1e-3


@pytest.mark.parametrize("fusion", ["none", "prefix", "cross"])
def test_kv_cache_decoding_matches_full_forward(fusion):
    torch.manual_seed(1)
    model = opened_gates(EHRDecoder(tiny(fusion))).eval()
    tokens, ages, prs, has_prs = inputs(length=16)
    full, _ = model(tokens, ages, prs, has_prs)
    logits, cache = model.prefill(tokens[:, :9], ages[:, :9], prs, has_prs)
    stepped = [logits]
    for t in range(9, 15):
        stepped.append(model.decode_step(tokens[:, t], ages[:, t], cache))
    torch.testing.assert_close(torch.stack(stepped, dim=1), full[:, 8:15], atol=1e-5, rtol=1e-4)
    assert cache.length == 15 + model.cfg.prefix_length


def test_loss_ignores_padding_and_matches_cross_entropy():
    torch.manual_seed(2)
    model = EHRDecoder(tiny("prefix")).eval()
    tokens, ages, prs, has_prs = inputs()
    targets = tokens.roll(-1, dims=1)
    targets[:, -4:] = PAD_ID
    logits, loss = model(tokens, ages, prs, has_prs, targets=targets)
    real = targets != PAD_ID
    expected = F.cross_entropy(logits[real], targets[real])
    torch.testing.assert_close(loss, expected)
    assert 0.5 * math.log(VOCAB) < loss.item() < 2 * math.log(VOCAB)  # near uniform at init
    _, empty = model(tokens, ages, prs, has_prs, targets=torch.full_like(targets, PAD_ID))
    assert empty.item() == 0.0  # an all-padding batch contributes nothing instead of NaN


@pytest.mark.parametrize("fusion", ["prefix", "cross"])
def test_missing_prs_ignores_scores_and_present_prs_uses_them(fusion):
    torch.manual_seed(3)
    model = opened_gates(EHRDecoder(tiny(fusion))).eval()
    tokens, ages, prs, _ = inputs()
    other = prs + 3.0
    missing = torch.zeros(3, dtype=torch.bool)
    present = torch.ones(3, dtype=torch.bool)
    a, _ = model(tokens, ages, prs, missing)
    b, _ = model(tokens, ages, other, missing)
    torch.testing.assert_close(a, b)  # non-genotyped: the scores on disk (zeros) can't leak in
    c, _ = model(tokens, ages, prs, present)
    d, _ = model(tokens, ages, other, present)
    assert (c - d).abs().max() > 1e-3
    assert (a - c).abs().max() > 1e-3  # "missing" differs from "present"
    none_given, _ = model(tokens, ages)  # no PRS tensors at all = everyone missing
    torch.testing.assert_close(none_given, a)


def test_modality_dropout_only_in_training():
    torch.manual_seed(4)
    encoder = EHRDecoder(tiny("prefix", modality_dropout=0.5)).prs_encoder
    prs, has_prs = torch.randn(4000, K), torch.ones(4000, dtype=torch.bool)
    encoder.train()
    _, kept = encoder(prs, has_prs)
    assert 0.45 < kept.float().mean().item() < 0.55
    encoder.eval()
    _, kept = encoder(prs, has_prs)
    assert kept.all()


def test_cross_fusion_at_init_reproduces_the_ehr_only_model():
    torch.manual_seed(5)
    base = EHRDecoder(tiny("none")).eval()
    fused = EHRDecoder(tiny("cross")).eval()
    new_keys = fused.load_base_weights(base.state_dict())
    assert new_keys and all(".cross." in k or k.startswith(("prs_encoder.", "cross_memory.")) for k in new_keys)
    tokens, ages, prs, has_prs = inputs()
    expected, _ = base(tokens, ages)
    got, _ = fused(tokens, ages, prs, has_prs)
    torch.testing.assert_close(got, expected)  # zero gates: pretrained EHR behaviour kept exactly


def test_adapter_mode_trains_only_prs_parts():
    torch.manual_seed(6)
    base = EHRDecoder(tiny("none"))
    model = EHRDecoder(tiny("cross", adapter=True))
    model.load_base_weights(base.state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(model.prs_parameter_names())
    assert 0 < model.num_parameters(trainable_only=True) < model.num_parameters() / 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens, ages, prs, has_prs = inputs()
    for _ in range(3):
        _, loss = model(tokens, ages, prs, has_prs, targets=tokens.roll(-1, dims=1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        assert moved == (name in trainable), name
    assert all(abs(p.item()) > 0 for n, p in model.named_parameters() if n.endswith("cross.gate"))


def test_load_base_weights_rejects_a_checkpoint_that_does_not_fit():
    fused = EHRDecoder(tiny("cross"))
    state = EHRDecoder(tiny("none")).state_dict()
    state["blocks.9.attn.qkv.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        fused.load_base_weights(state)
    partial = {k: v for k, v in EHRDecoder(tiny("none")).state_dict().items() if not k.startswith("blocks.0.")}
    with pytest.raises(ValueError, match="missing non-PRS"):
        fused.load_base_weights(partial)


def test_hidden_states_and_next_token_logits_for_right_padded_batches():
    torch.manual_seed(7)
    model = EHRDecoder(tiny("prefix")).eval()
    tokens, ages, prs, has_prs = inputs(length=10)
    lengths = torch.tensor([10, 6, 3])
    padded = tokens.clone()
    for row, n in enumerate(lengths):
        padded[row, n:] = PAD_ID
    hidden = model.hidden_states(padded, ages, prs, has_prs)
    positions = torch.stack([lengths - 1, torch.zeros(3, dtype=torch.long)], dim=1)
    picked = model.hidden_states(padded, ages, prs, has_prs, positions=positions)
    assert picked.shape == (3, 2, 32)
    torch.testing.assert_close(picked[:, 0], hidden[torch.arange(3), lengths - 1])
    next_logits = model.next_token_logits(padded, ages, prs, has_prs, lengths=lengths)
    for row, n in enumerate(lengths):  # same as running the unpadded sequence alone
        alone, _ = model(tokens[row : row + 1, :n], ages[row : row + 1, :n], prs[row : row + 1], has_prs[row : row + 1])
        torch.testing.assert_close(next_logits[row], alone[0, -1], atol=1e-5, rtol=1e-4)
    head = ClassificationHead(32, outputs=1)
    assert head(picked[:, 0]).shape == (3, 1)


@torch.no_grad()
def greedy_decode(model, tokens, ages, prs, has_prs, steps: int) -> torch.Tensor:
    """Greedy continuation with the KV cache: prefill once, then one decode step per token."""
    logits, cache = model.prefill(tokens, ages, prs, has_prs)
    out = []
    for _ in range(steps):
        nxt = logits.argmax(dim=-1)
        out.append(nxt)
        logits = model.decode_step(nxt, ages[:, -1], cache)
    return torch.stack(out, dim=1)


def test_greedy_generation_follows_the_argmax_of_full_forwards():
    torch.manual_seed(8)
    model = opened_gates(EHRDecoder(tiny("cross"))).eval()
    tokens, ages, prs, has_prs = inputs(length=5)
    out = greedy_decode(model, tokens, ages, prs, has_prs, steps=4)
    seq, seq_ages = tokens, ages
    for step in range(4):
        logits, _ = model(seq, seq_ages, prs, has_prs)
        nxt = logits[:, -1].argmax(-1)
        assert torch.equal(out[:, step], nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        seq_ages = torch.cat([seq_ages, seq_ages[:, -1:]], dim=1)


def test_model_files_round_trip_with_weights_only(tmp_path):
    torch.manual_seed(9)
    model = EHRDecoder(tiny("prefix")).eval()
    assert model.lm_head.weight is model.tok_emb.weight  # tied
    save_model_files(tmp_path, model.state_dict(), model.cfg)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state["lm_head.weight"].data_ptr() == state["tok_emb.weight"].data_ptr()  # stored once
    loaded = load_model(tmp_path)
    assert loaded.cfg == model.cfg
    tokens, ages, prs, has_prs = inputs()
    torch.testing.assert_close(loaded(tokens, ages, prs, has_prs)[0], model(tokens, ages, prs, has_prs)[0])
    assert set(load_state_dict(tmp_path)) == set(model.state_dict())


def test_initialisation_scales_residual_projections():
    torch.manual_seed(10)
    cfg = tiny("none", hidden=128, layers=8, heads=4)
    model = EHRDecoder(cfg)
    proj = torch.cat(
        [b.attn.proj.weight.flatten() for b in model.blocks] + [b.mlp.proj.weight.flatten() for b in model.blocks]
    )
    expected = cfg.init_std / math.sqrt(2 * cfg.layers)
    assert abs(proj.std().item() - expected) / expected < 0.05
    assert abs(model.tok_emb.weight.std().item() - cfg.init_std) / cfg.init_std < 0.05


@pytest.mark.parametrize("fusion,low,high", [("none", 240e6, 260e6), ("prefix", 290e6, 310e6), ("cross", 305e6, 330e6)])
def test_reference_design_is_about_300m_parameters(fusion, low, high):
    cfg = ModelConfig(vocab_size=120_000, num_pgs=3481, fusion=fusion)  # defaults: 960 x 12 x 8, 2,048 context
    with torch.device("meta"):
        model = EHRDecoder(cfg)
    assert low < model.num_parameters() < high
    assert cfg.head_dim == 120 and cfg.context == 2048


def test_config_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(hidden=30, heads=4)
    with pytest.raises(ValueError, match="even"):
        ModelConfig(hidden=36, heads=4)
    with pytest.raises(ValueError, match="adapter"):
        ModelConfig(adapter=True, fusion="none")
    with pytest.raises(ValueError, match="cross_every"):
        ModelConfig(layers=2, fusion="cross", cross_every=3)
    with pytest.raises(ValueError, match="manifest says 99"):
        tiny().with_data(vocab_size=99, num_pgs=K)
    filled = dataclasses.replace(tiny(), vocab_size=0, num_pgs=0).with_data(77, 5)
    assert (filled.vocab_size, filled.num_pgs) == (77, 5)
    with pytest.raises(ValueError, match="vocab_size"):
        EHRDecoder(ModelConfig(hidden=32, layers=1, heads=4))
    with pytest.raises(ValueError, match="num_pgs"):
        EHRDecoder(ModelConfig(vocab_size=10, hidden=32, layers=1, heads=4, fusion="prefix"))
