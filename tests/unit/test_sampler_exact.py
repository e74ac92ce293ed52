"""The shared-prefix sampler (`sample_trajectories`) against the reference sampler it replaced
(`sample_trajectories_reference`), same process, same seeds, fp32 on CPU: identical tokens, ages,
stop codes, hits and shares, path probabilities within 1e-6; and the prompt's keys/values held
once per prompt, not once per continuation. Pure torch, tiny models.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ehrfm.constants import EOS_ID, PAD_ID
from ehrfm.model import EHRDecoder, ModelConfig
from ehrfm.model.sampling import (
    STOP_EOS,
    STOP_HORIZON,
    STOP_TRUNCATED,
    _draw,
    draw,
    filter_logits,
    sample_trajectories,
    sample_trajectories_reference,
)

VOCAB, K = 48, 5
GAP_DAYS = torch.zeros(VOCAB, dtype=torch.float64)
GAP_DAYS[4:8] = torch.tensor([1.0, 7.0, 30.0, 365.0], dtype=torch.float64)
TARGETS = [9, 10, 11]


def tiny_decoder(seed: int, fusion: str, eos_bias: float = 0.0, gap_bias: float = 0.0) -> EHRDecoder:
    """A random decoder; its output layer gets a bias (untied from the input embedding) that makes
    EOS and the gap tokens as likely as the test needs."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        num_pgs=K,
        hidden=32,
        layers=3,
        heads=4,
        context=64,
        fusion=fusion,
        prs_tokens=3,
        prs_hidden=16,
        cross_every=1,
        init_std=0.2,  # far from uniform next-token distributions, so wrong attention shows in the draws
    )
    model = EHRDecoder(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("cross.gate"):
                param.fill_(0.7)  # open the gates so the PRS memory matters
        head = nn.Linear(cfg.hidden, VOCAB, bias=True)
        head.weight.copy_(model.tok_emb.weight)
        head.bias.zero_()
        head.bias[EOS_ID] = eos_bias
        head.bias[4:8] = gap_bias
        model.lm_head = head
    return model


def ragged_prompts(lengths: list[int], seed: int, width: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    tokens = torch.randint(8, VOCAB, (len(lengths), width), generator=gen)
    ages = 15_000 + torch.cumsum(torch.randint(0, 40, (len(lengths), width), generator=gen), dim=1)
    for row, n in enumerate(lengths):
        tokens[row, n:], ages[row, n:] = PAD_ID, 0
    has_prs = torch.tensor([row % 3 != 1 for row in range(len(lengths))])
    return tokens, ages, torch.tensor(lengths), torch.randn(len(lengths), K, generator=gen), has_prs


def both(model, inputs, seeds, **settings):
    defaults = dict(
        n_samples=6,
        max_new_tokens=24,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        target_ids=TARGETS,
        gap_days=GAP_DAYS,
        horizon_days=400.0,
    )
    defaults |= settings
    sync = {k: defaults.pop(k) for k in ("sync_every", "compact_below") if k in defaults}
    ref = sample_trajectories_reference(model, *inputs, seeds=seeds, **defaults)
    new = sample_trajectories(model, *inputs, seeds=seeds, **defaults, **sync)
    return ref, new


def assert_same(ref, new):
    assert torch.equal(new.tokens, ref.tokens)
    assert torch.equal(new.ages, ref.ages)
    assert torch.equal(new.stop, ref.stop)
    assert torch.equal(new.hit, ref.hit)
    assert torch.equal(new.share, ref.share)
    assert torch.equal(new.truncated, ref.truncated)
    torch.testing.assert_close(new.p_target, ref.p_target, atol=1e-6, rtol=0)
    torch.testing.assert_close(new.path_probability, ref.path_probability, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fusion", ["none", "prefix", "cross"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_draws_as_the_reference_for_ragged_prompts(fusion, seed):
    model = tiny_decoder(seed, fusion, eos_bias=1.0)
    inputs = ragged_prompts([17, 5, 11, 1], seed)
    ref, new = both(model, inputs, seeds=[100 * seed + i for i in range(4)])
    assert_same(ref, new)
    stops = set(ref.stop.tolist())
    assert STOP_EOS in stops and (STOP_HORIZON in stops or STOP_TRUNCATED in stops)  # mixed ends exercised


@pytest.mark.parametrize("fusion", ["prefix", "cross"])
@pytest.mark.parametrize("sync_every,compact_below", [(1, 1.0), (3, 0.75), (5, 0.0), (64, 1.0)])
def test_compaction_and_sync_interval_do_not_change_the_draws(fusion, sync_every, compact_below):
    model = tiny_decoder(7, fusion, eos_bias=1.5)
    inputs = ragged_prompts([9, 14, 3, 6, 12], 7)
    ref, new = both(model, inputs, seeds=[5, 6, 7, 8, 9], sync_every=sync_every, compact_below=compact_below)
    assert_same(ref, new)
    assert (ref.stop == STOP_EOS).any()


@pytest.mark.parametrize("horizon,expected", [(1e9, STOP_TRUNCATED), (30.0, STOP_HORIZON)])
def test_horizon_and_truncation_stops_match(horizon, expected):
    model = tiny_decoder(3, "prefix", eos_bias=-3.0, gap_bias=2.5)
    inputs = ragged_prompts([8, 4, 13], 3)
    ref, new = both(model, inputs, seeds=[1, 2, 3], horizon_days=horizon, max_new_tokens=16)
    assert_same(ref, new)
    assert (ref.stop == expected).any()


@pytest.mark.parametrize(
    "sampler",
    [
        dict(temperature=0.8, top_k=12, top_p=0.9),
        dict(temperature=0.0),
        dict(temperature=1.3, top_p=0.7),
    ],
)
def test_filtered_and_greedy_samplers_match(sampler):
    model = tiny_decoder(11, "cross", eos_bias=1.0)
    inputs = ragged_prompts([10, 2, 7], 11)
    ref, new = both(model, inputs, seeds=[4, 5, 6], **sampler)
    assert_same(ref, new)


def test_single_future_and_single_new_token():
    model = tiny_decoder(2, "none")
    inputs = ragged_prompts([6, 3], 2)
    for n_samples, max_new_tokens in ((1, 12), (4, 1), (1, 1)):
        ref, new = both(model, inputs, seeds=[0, 1], n_samples=n_samples, max_new_tokens=max_new_tokens)
        assert_same(ref, new)


def test_a_prompt_is_scored_alike_alone_and_in_a_batch():
    model = tiny_decoder(5, "prefix", eos_bias=1.0)
    tokens, ages, lengths, prs, has_prs = ragged_prompts([12, 7, 3], 5)
    settings = dict(n_samples=4, max_new_tokens=10, temperature=1.0, top_k=0, top_p=1.0, target_ids=TARGETS)
    settings |= dict(gap_days=GAP_DAYS, horizon_days=400.0)
    batched = sample_trajectories(model, tokens, ages, lengths, prs, has_prs, seeds=[11, 12, 13], **settings)
    for row, n in enumerate(lengths.tolist()):
        one = slice(row, row + 1)
        alone = sample_trajectories(
            model, tokens[one, :n], ages[one, :n], lengths[one], prs[one], has_prs[one], seeds=[11 + row], **settings
        )
        assert torch.equal(batched.tokens[4 * row : 4 * row + 4], alone.tokens)
        assert batched.share[row] == alone.share[0]


@pytest.mark.parametrize("fusion", ["prefix", "cross"])
def test_prompt_keys_are_held_once_per_prompt_not_per_future(fusion):
    model = tiny_decoder(0, fusion)
    prompts, futures, new_tokens, width = 3, 16, 8, 40
    tokens, ages, lengths, prs, has_prs = ragged_prompts([40, 25, 31], 0, width)
    _, cache, _ = model.prefill_shared(
        tokens, ages, prs, has_prs, lengths=lengths, futures=futures, capacity=new_tokens - 1
    )
    cfg = model.cfg
    prefix_len = width + cfg.prefix_length
    for keys, values in zip(cache.prefix_keys, cache.prefix_values):
        assert keys.shape == values.shape == (prompts, cfg.heads, prefix_len, cfg.head_dim)
    for keys in cache.suffix_keys:
        assert keys.shape == (prompts * futures, cfg.heads, new_tokens - 1, cfg.head_dim)
    sizes = cache.nbytes()
    per_position = cfg.layers * 2 * cfg.heads * cfg.head_dim * 4
    cross = sum(t.numel() * t.element_size() for kv in cache.cross.values() for t in kv)
    assert sizes["prefix"] == prompts * prefix_len * per_position + cross
    assert sizes["suffix"] == prompts * futures * (new_tokens - 1) * per_position
    # the reference replicates the prompt: N times the prefix
    _, ref_cache = model.prefill(tokens, ages, prs, has_prs, lengths=lengths)
    replicated = ref_cache.select(torch.arange(prompts).repeat_interleave(futures))
    assert replicated.keys[0].shape[0] == prompts * futures
    ref_prefix = sum(k.numel() * k.element_size() for k in replicated.keys + replicated.values)
    assert ref_prefix == futures * (sizes["prefix"] - cross)


def test_decode_writes_in_place_without_growing_the_cache():
    model = tiny_decoder(1, "prefix")
    tokens, ages, lengths, prs, has_prs = ragged_prompts([9, 4], 1)
    _, cache, last_age = model.prefill_shared(tokens, ages, prs, has_prs, lengths=lengths, futures=3, capacity=5)
    storage = [k.data_ptr() for k in cache.suffix_keys]
    for step in range(5):
        model.decode_shared(torch.full((6,), 12 + step), last_age.repeat_interleave(3) + step, cache)
    assert [k.data_ptr() for k in cache.suffix_keys] == storage
    assert cache.steps == 5
    with pytest.raises(ValueError, match="suffix cache full"):
        model.decode_shared(torch.full((6,), 12), last_age.repeat_interleave(3), cache)


@pytest.mark.parametrize("vocab", [1, 3, 64, 100, 2000, 2001])
def test_two_level_draw_picks_what_the_sequential_cdf_picks(vocab):
    gen = torch.Generator().manual_seed(vocab)
    for trial in range(20):
        logits = torch.randn(32, vocab, generator=gen) * (1 + 10 * trial / 20)
        top_k = int(torch.randint(0, vocab + 1, (1,), generator=gen))
        weights = torch.softmax(filter_logits(logits, 1.0, top_k, 0.05 + 0.95 * trial / 20), dim=-1)
        if vocab > 2:
            weights[:, :2] = 0.0  # blocked tokens lead every row
        uniforms = torch.rand(32, generator=gen, dtype=torch.float64)
        uniforms[:3] = torch.tensor([0.0, 1 - 2**-53, 1 - 1e-12], dtype=torch.float64)  # the clamp cases
        assert torch.equal(_draw(weights, uniforms), draw(weights, uniforms))


@pytest.mark.parametrize("fusion", ["prefix", "cross"])
def test_the_matmul_attention_path_gives_the_same_draws(fusion, monkeypatch):
    """The path used where no fused kernel returns the log-sum-exp (GPU): same draws as well."""
    import ehrfm.model.transformer as transformer

    monkeypatch.setattr(transformer, "_FLASH_WITH_LSE", None)
    model = tiny_decoder(13, fusion, eos_bias=1.0)
    inputs = ragged_prompts([15, 4, 9], 13)
    ref, new = both(model, inputs, seeds=[7, 8, 9], sync_every=2, compact_below=1.0)
    assert_same(ref, new)


def test_fused_and_matmul_attention_agree():
    from ehrfm.model.transformer import shared_prefix_attention

    model = tiny_decoder(4, "prefix")
    tokens, ages, lengths, prs, has_prs = ragged_prompts([11, 3, 7], 4)
    _, cache, last_age = model.prefill_shared(tokens, ages, prs, has_prs, lengths=lengths, futures=4, capacity=6)
    for step in range(3):
        model.decode_shared(torch.full((12,), 20 + step), last_age.repeat_interleave(4) + step, cache)
    q = torch.randn(12, model.cfg.heads, 1, model.cfg.head_dim)
    fused = shared_prefix_attention(q, cache, 1, 4, 3, fused=True)
    plain = shared_prefix_attention(q, cache, 1, 4, 3, fused=False)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-5)


def test_regrouping_keeps_each_group_to_one_prompt_and_memory_within_the_first_allocation():
    from ehrfm.model.sampling import _regroup

    futures, group_prompt = 4, [0, 1, 2]
    alive = [True, False, True, True] + [False] * 4 + [False, False, False, True]
    assert _regroup([False] * 12, group_prompt, futures, 1.0) is None
    assert _regroup([True] * 12, group_prompt, futures, 0.9) is True  # nothing to gain: layout kept
    groups, slots, prompts, size, flags = _regroup(alive, group_prompt, futures, 1.0, 100, 10, 3 * 100 + 12 * 10)
    assert len(slots) == len(flags) == len(groups) * size == len(prompts) * size
    for g, prompt in enumerate(prompts):
        members = slots[g * size : (g + 1) * size]
        assert all(slot // futures == prompt for slot in members)  # a group holds one prompt's futures
        assert all(groups[g] == prompt for _ in members)
    live = sorted(s for s, f in zip(slots, flags) if f)
    assert live == [i for i, a in enumerate(alive) if a]
    assert len(groups) * 100 + len(slots) * 10 <= 3 * 100 + 12 * 10
    # a tight budget forbids extra prompt copies: the groups stay one per prompt
    groups, slots, prompts, size, flags = _regroup(alive, group_prompt, futures, 1.0, 100, 10, 2 * 100 + 6 * 10)
    assert prompts == [0, 2] and size == 3
