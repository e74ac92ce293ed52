"""Zero-shot risk from sampled futures: the sampler's filters, the path probability, the horizon,
KV-cache decoding of ragged prompts, the target mapping and the CLI (the Ray Data job: tests/integration).

Exact expectations come from "Markov decoders": real EHRDecoders whose weights make the next-token
distribution depend only on the last token, with transition probabilities the test chooses.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ehrfm.constants import BOS_ID, EOS_ID, PAD_ID
from ehrfm.model import EHRDecoder, ModelConfig
from ehrfm.model.sampling import (
    STOP_EOS,
    STOP_HORIZON,
    STOP_TRUNCATED,
    draw,
    filter_logits,
    path_probability,
    sample_trajectories,
)
from ehrfm.tasks.concept_sets import dataset_codebook
from ehrfm.tasks.definitions import ConceptCriteria, TaskDefinition
from ehrfm.transfer.zero_shot import (
    gap_days_per_token,
    target_token_ids,
)
from tests.support.zero_shot_cohort import T2D_TASK, write_tiny_cohort

# Markov-decoder vocabulary: specials 0-3, then two one-year gaps, a long gap, the target, states.
GAP_A, GAP_B, GAP_LONG, TARGET, S0, S1, S2 = 4, 5, 6, 7, 8, 9, 10
MARKOV_VOCAB = 12
MARKOV_GAP_DAYS = torch.zeros(MARKOV_VOCAB, dtype=torch.float64)
MARKOV_GAP_DAYS[[GAP_A, GAP_B, GAP_LONG]] = torch.tensor([365.0, 365.0, 800.0], dtype=torch.float64)


def markov_decoder(transitions: dict[int, dict[int, float]]) -> EHRDecoder:
    """A real decoder with p(next | last token x) = transitions[x] (EOS for unlisted tokens).

    Token embeddings are one-hot, every block's output projection and the age projection are zero
    (so the final norm sees only the last token), and an untied output layer holds log p / sqrt(h).
    """
    hidden = 16
    model = EHRDecoder(ModelConfig(vocab_size=MARKOV_VOCAB, hidden=hidden, layers=1, heads=2, context=64))
    log_p = torch.full((MARKOV_VOCAB, MARKOV_VOCAB), -1e4)  # [next, last]
    log_p[EOS_ID, :] = 0.0
    for last, row in transitions.items():
        assert math.isclose(sum(row.values()), 1.0)
        log_p[:, last] = -1e4
        for nxt, p in row.items():
            log_p[nxt, last] = math.log(p) if p > 0 else -1e4
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")) or name == "age_emb.proj.weight":
                param.zero_()
        model.tok_emb.weight.copy_(torch.eye(MARKOV_VOCAB, hidden))
        model.lm_head = nn.Linear(hidden, MARKOV_VOCAB, bias=False)
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, :MARKOV_VOCAB] = log_p / math.sqrt(hidden)
    return model.eval()


def run_markov(model, *, n_samples=8, max_new_tokens=8, horizon_days=730.0, seed=0, **sampler):
    """Sample from one prompt `[BOS, S0]` at age 10,000 days."""
    settings = dict(temperature=1.0, top_k=0, top_p=1.0) | sampler
    return sample_trajectories(
        model,
        torch.tensor([[BOS_ID, S0]]),
        torch.tensor([[10_000, 10_000]]),
        torch.tensor([2]),
        None,
        None,
        n_samples=n_samples,
        max_new_tokens=max_new_tokens,
        target_ids=[TARGET],
        gap_days=MARKOV_GAP_DAYS,
        horizon_days=horizon_days,
        seeds=[seed],
        **settings,
    )


# ---- sampler pieces ------------------------------------------------------------------------------
def test_top_k_top_p_and_temperature_filters_are_exact():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = probs.log()
    kept = lambda out: torch.isfinite(out) & (out > torch.finfo(out.dtype).min)  # noqa: E731
    assert kept(filter_logits(logits, 1.0, top_k=2)).tolist() == [[True, True, False, False, False]]
    assert kept(filter_logits(logits, 1.0, top_p=0.75)).tolist() == [[True, True, True, False, False]]
    assert kept(filter_logits(logits, 1.0, top_p=0.5)).tolist() == [[True, False, False, False, False]]
    assert kept(filter_logits(logits, 0.0)).tolist() == [[True, False, False, False, False]]
    torch.testing.assert_close(filter_logits(logits, 1.0), logits)  # both filters off
    # temperature 2 -> p^(1/2), renormalised over the top 3
    tempered = torch.softmax(filter_logits(logits, 2.0, top_k=3), dim=-1)
    root = probs[0, :3].sqrt()
    torch.testing.assert_close(tempered[0], torch.cat([root / root.sum(), torch.zeros(2)]))
    # top-k first, then top-p on the renormalised survivors: 0.5/0.85 = 0.59 < 0.6 keeps a second token
    assert kept(filter_logits(logits, 1.0, top_k=3, top_p=0.6)).tolist() == [[True, True, False, False, False]]
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, 1.0, top_p=0.0)


def test_inverse_cdf_draw_never_picks_a_zero_weight_token():
    weights = torch.tensor([[0.0, 0.2, 0.0, 0.3, 0.5, 0.0]]).repeat(5, 1)
    uniforms = torch.tensor([0.0, 0.1, 0.2, 0.6, 1.0], dtype=torch.float64)
    assert draw(weights, uniforms).tolist() == [1, 1, 3, 4, 4]


def test_path_probability_of_a_fixed_hazard_sequence():
    p = torch.tensor([[0.1, 0.3, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0], [1.0, 0.7, 0.2, 0.9]], dtype=torch.float64)
    expected = [0.1 + 0.9 * 0.3 + 0.9 * 0.7 * 0.5, 0.0, 1.0]
    torch.testing.assert_close(path_probability(p), torch.tensor(expected, dtype=torch.float64))


# ---- trajectories --------------------------------------------------------------------------------
def test_share_and_path_probability_estimate_the_same_chance():
    # S0 -> target .3 / S1 .7; S1 -> target .2 / S2 .8; S2 -> EOS: P(target) = .3 + .7 * .2 = .44
    model = markov_decoder({S0: {TARGET: 0.3, S1: 0.7}, S1: {TARGET: 0.2, S2: 0.8}, S2: {EOS_ID: 1.0}})
    result = run_markov(model, n_samples=3000)
    assert result.path_probability.item() == pytest.approx(0.44, abs=1e-4)  # every path is S0 S1 S2 EOS
    assert result.share.item() == pytest.approx(0.44, abs=0.04)  # binomial, sd 0.009
    assert (result.stop == STOP_EOS).all() and result.truncated.item() == 0
    assert result.tokens[0, :3].tolist() == [S1, S2, EOS_ID]  # the continuation fed on is target-free
    torch.testing.assert_close(
        result.p_target[0, :3], torch.tensor([0.3, 0.2, 0.0], dtype=torch.float64), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("horizon, counted", [(730.0, True), (729.0, False)])
def test_a_gap_that_crosses_the_horizon_ends_the_trajectory(horizon, counted):
    # two one-year gaps, then a certain target: elapsed 730 days when the target comes
    model = markov_decoder({S0: {GAP_A: 1.0}, GAP_A: {GAP_B: 1.0}, GAP_B: {TARGET: 1.0}})
    result = run_markov(model, n_samples=4, horizon_days=horizon)
    assert result.share.tolist() == [1.0 if counted else 0.0]
    assert result.path_probability.item() == pytest.approx(1.0 if counted else 0.0, abs=1e-5)
    assert result.tokens[0, :2].tolist() == [GAP_A, GAP_B]
    assert result.ages[0, :2].tolist() == [10_365, 10_730]  # the age input moves with the clock
    if not counted:
        assert (result.stop == STOP_HORIZON).all() and (result.tokens[:, 2:] == PAD_ID).all()


def test_certain_target_gives_one_and_unreachable_target_gives_zero_with_truncation_counted():
    always = run_markov(markov_decoder({S0: {TARGET: 1 - 1e-6, EOS_ID: 1e-6}}), n_samples=16)
    assert always.share.item() == 1.0 and always.path_probability.item() > 0.999
    never = run_markov(
        markov_decoder({S0: {S0: 0.5, GAP_A: 0.5}, GAP_A: {S0: 1.0}}),
        n_samples=16,
        max_new_tokens=5,
        horizon_days=10_000,
    )
    assert never.share.item() == 0.0 and never.path_probability.item() == 0.0
    assert never.truncated.item() == 16 and (never.stop == STOP_TRUNCATED).all()


VOCAB, K = 40, 5
RANDOM_GAP_DAYS = torch.zeros(VOCAB, dtype=torch.float64)
RANDOM_GAP_DAYS[4:8] = torch.tensor([1.0, 7.0, 30.0, 365.0], dtype=torch.float64)


def random_decoder(seed: int = 0, fusion: str = "prefix") -> EHRDecoder:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        num_pgs=K,
        hidden=32,
        layers=2,
        heads=4,
        context=32,
        fusion=fusion,
        prs_tokens=3,
        prs_hidden=16,
        cross_every=1,
    )
    model = EHRDecoder(cfg).eval()
    with torch.no_grad():  # cross-attention gates start closed; open them so the PRS memory matters
        for name, param in model.named_parameters():
            if name.endswith("cross.gate"):
                param.fill_(0.7)
    return model


def prompts(lengths: list[int], width: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(8, VOCAB, (len(lengths), width), generator=gen)
    ages = 15_000 + torch.cumsum(torch.randint(0, 40, (len(lengths), width), generator=gen), dim=1)
    for row, n in enumerate(lengths):
        tokens[row, n:], ages[row, n:] = PAD_ID, 0
    return (
        tokens,
        ages,
        torch.tensor(lengths),
        torch.randn(len(lengths), K, generator=gen),
        torch.tensor([True, False, True][: len(lengths)]),
    )


def test_greedy_kv_cache_decoding_matches_step_by_step_recomputation():
    model = random_decoder(3)
    tokens, ages, lengths, prs, has_prs = prompts([10, 4])
    targets = [12, 13]
    result = sample_trajectories(
        model,
        tokens,
        ages,
        lengths,
        prs,
        has_prs,
        n_samples=2,
        max_new_tokens=6,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        target_ids=targets,
        gap_days=RANDOM_GAP_DAYS,
        horizon_days=1e9,
        seeds=[0, 1],
    )
    for prompt in range(2):
        n = int(lengths[prompt])
        seq, seq_ages = tokens[prompt : prompt + 1, :n], ages[prompt : prompt + 1, :n]
        p_steps, hit = [], False
        for step in range(6):
            logits, _ = model(seq, seq_ages, prs[prompt : prompt + 1], has_prs[prompt : prompt + 1])
            scores = logits[0, -1].masked_fill(torch.tensor([i in (PAD_ID, BOS_ID) for i in range(VOCAB)]), -1e9)
            p_steps.append(torch.softmax(scores, -1)[targets].sum().item())
            hit |= int(scores.argmax()) in targets
            scores[targets] = -1e9
            nxt = int(scores.argmax())
            for row in (2 * prompt, 2 * prompt + 1):  # greedy: both samples identical
                assert int(result.tokens[row, step]) == nxt
                assert result.p_target[row, step].item() == pytest.approx(p_steps[-1], abs=1e-5)
            if nxt == EOS_ID:
                break
            age = seq_ages[0, -1] + RANDOM_GAP_DAYS[nxt].long()
            seq, seq_ages = torch.cat([seq, torch.tensor([[nxt]])], 1), torch.cat([seq_ages, age.view(1, 1)], 1)
        expected = path_probability(torch.tensor(p_steps, dtype=torch.float64)).item()
        assert result.path_probability[prompt].item() == pytest.approx(expected, abs=1e-5)
        assert result.share[prompt].item() == float(hit)


@pytest.mark.parametrize("fusion", ["none", "prefix", "cross"])
def test_ragged_prefill_then_decode_matches_each_unpadded_prompt(fusion):
    model = random_decoder(4, fusion)
    tokens, ages, lengths, prs, has_prs = prompts([12, 7, 3])
    first, cache = model.prefill(tokens, ages, prs, has_prs, lengths=lengths)
    new_tokens, new_ages = torch.tensor([[9, 10, 11], [12, 13, 14]]), ages[torch.arange(3), lengths - 1] + 5
    steps = [model.decode_step(new_tokens[i], new_ages, cache) for i in range(2)]
    for row, n in enumerate(lengths.tolist()):
        alone_first, alone = model.prefill(
            tokens[row : row + 1, :n], ages[row : row + 1, :n], prs[row : row + 1], has_prs[row : row + 1]
        )
        torch.testing.assert_close(first[row], alone_first[0], atol=1e-6, rtol=1e-6)
        for i in range(2):
            alone_step = model.decode_step(new_tokens[i, row : row + 1], new_ages[row : row + 1], alone)
            torch.testing.assert_close(steps[i][row], alone_step[0], atol=1e-6, rtol=1e-6)  # wrong positions: ~1e-4


@pytest.mark.parametrize("fusion", ["prefix", "cross"])
def test_padded_prompts_of_different_lengths_score_as_each_prompt_alone(fusion):
    model = random_decoder(5, fusion)
    tokens, ages, lengths, prs, has_prs = prompts([12, 7, 3])
    settings = dict(
        n_samples=4,
        max_new_tokens=10,
        temperature=0.9,
        top_k=20,
        top_p=0.95,
        target_ids=[9, 10, 11],
        gap_days=RANDOM_GAP_DAYS,
        horizon_days=400.0,
    )
    batched = sample_trajectories(model, tokens, ages, lengths, prs, has_prs, seeds=[11, 12, 13], **settings)
    for row, n in enumerate(lengths.tolist()):
        alone = sample_trajectories(
            model,
            tokens[row : row + 1, :n],
            ages[row : row + 1, :n],
            lengths[row : row + 1],
            prs[row : row + 1],
            has_prs[row : row + 1],
            seeds=[11 + row],
            **settings,
        )
        assert torch.equal(batched.tokens[4 * row : 4 * row + 4], alone.tokens)
        assert batched.share[row] == alone.share[0]
        torch.testing.assert_close(batched.path_probability[row], alone.path_probability[0])
    assert batched.p_target.gt(0).any() and not torch.equal(batched.tokens[0:4], batched.tokens[4:8])


# ---- the job: target mapping, Ray Data, CLI ------------------------------------------------------


def test_target_codes_and_gap_days_come_from_the_tokenizer(tmp_path):
    tok, _ = write_tiny_cohort(tmp_path)
    ids, account = target_token_ids(T2D_TASK, tok, dataset_codebook(tmp_path))
    assert ids == [tok.token_id["SNOMED/44054006"]]  # T2D 201826 in the data's code form
    assert account == {
        "target_codes": 2,
        "in_vocabulary": 1,
        "not_in_vocabulary": 1,
        "measurement_thresholds_ignored": 0,
    }
    lower, middle = gap_days_per_token(tok, "lower"), gap_days_per_token(tok, "midpoint")
    gaps = [tok.token_id[g] for g in ("GAP/1-6D", "GAP/7-29D", "GAP/30-364D", "GAP/365D+")]
    assert lower[gaps].tolist() == [1, 7, 30, 365] and middle[gaps].tolist() == [3, 18, 197, 365]
    assert lower.sum().item() == 403  # every other token leaves the clock alone
    with pytest.raises(ValueError, match="none of its 1 target codes"):
        target_token_ids(TaskDefinition(name="x", target=ConceptCriteria(condition=[42])), tok)
    with pytest.raises(ValueError, match="none of its 2 target codes"):  # the id form is not this data's form
        target_token_ids(T2D_TASK, tok)
