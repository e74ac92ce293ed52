"""Zero-shot risk: sample futures from the pretrained decoder and read the outcome off them.

For each prompt (a prediction window) N continuations are decoded together: the prompt is
prefilled once and its keys/values are shared by its N continuations (no copies), each of which
writes its own tokens' keys/values in place into a preallocated suffix (`SharedPrefixCache`).
`sample_trajectories_reference` is the first implementation (the prompt cache replicated N times,
grown by concatenation), kept to test the fast one against and as the benchmark baseline; both
consume the per-prompt random streams identically and return the same draws. A continuation stops at
EOS, when its summed gap-token time passes the horizon (the crossing gap token ends it: nothing
after it counts), or after `max_new_tokens` (truncated, and counted as such).

Two scores per prompt, both estimates of P(target code within the horizon) under the model:
  share             the fraction of the N continuations in which a target code occurs;
  path_probability  the mean over continuations of sum_t p_t * prod_{s<t} (1 - p_s), where p_t
                    is the model's probability mass on the target codes at step t.
The continuations are sampled target-free: at each step a Bernoulli draw with the sampler's
target mass decides whether the target occurs there (it is then counted for `share`), and the
token fed on is drawn from the sampler restricted to non-target tokens. Up to the first target
this is exactly the sampler's own process, so `share` is unchanged in law; and the path
probability then sums the hazard along futures in which the outcome has not happened yet, which
is what the product (1 - p_s) assumes. p_t is the plain model distribution (no temperature,
top-k or top-p), so with the default sampler both scores estimate the same probability.

Randomness comes from one generator per prompt (seeded by the caller), drawn up front, so a
prompt's result does not depend on the batch it is scored in. Plain torch: no Ray here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ehrfm.constants import BOS_ID, EOS_ID, PAD_ID
from ehrfm.model.transformer import EHRDecoder

# Why a continuation stopped (per row of `Trajectories.stop`).
RUNNING, STOP_EOS, STOP_HORIZON, STOP_TRUNCATED = 0, 1, 2, 3
# Tokens that can never follow a prompt: padding and start-of-timeline.
NEVER_GENERATED = (PAD_ID, BOS_ID)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits of the sampling distribution: tempered, then top-k, then top-p (nucleus); removed -> -inf.

    temperature 0 is greedy (only the argmax stays); top_k 0 and top_p 1 switch those filters off.
    top-p keeps the most likely tokens until their mass reaches top_p, the token crossing it included.
    """
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    neg_inf = torch.finfo(logits.dtype).min
    if temperature == 0:
        scaled, top_k = logits, 1
    else:
        scaled = logits / temperature
    if 0 < top_k < scaled.shape[-1]:
        keep = torch.zeros_like(scaled, dtype=torch.bool).scatter(-1, scaled.topk(top_k, dim=-1).indices, True)
        scaled = scaled.masked_fill(~keep, neg_inf)
    if top_p < 1.0:
        probs, order = torch.softmax(scaled, dim=-1).sort(dim=-1, descending=True)
        mass_before = probs.cumsum(dim=-1) - probs
        keep = torch.zeros_like(scaled, dtype=torch.bool).scatter(-1, order, mass_before < top_p)
        scaled = scaled.masked_fill(~keep, neg_inf)
    return scaled


def draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One index per row from non-negative `weights` [B, V] (any total > 0) by inverse CDF of `uniforms` [B]."""
    cdf = weights.double().cumsum(dim=-1)
    picked = torch.searchsorted(cdf, (uniforms.double() * cdf[:, -1])[:, None].contiguous(), right=True).squeeze(1)
    last_positive = weights.shape[-1] - 1 - (weights > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(picked, last_positive)  # u * total rounding up to the total must not pick a zero


def path_probability(p: torch.Tensor) -> torch.Tensor:
    """sum_t p_t prod_{s<t} (1 - p_s) along the last dimension (chance the first event is within t steps)."""
    survival = torch.cumprod(1 - p, dim=-1)
    before = torch.cat([torch.ones_like(p[..., :1]), survival[..., :-1]], dim=-1)
    return (p * before).sum(dim=-1)


@dataclass
class Trajectories:
    """Per prompt: the two scores and the truncated count; per continuation (row r = prompt * N + i):
    the tokens and ages fed back (PAD / 0 after the end), whether the target occurred, why it stopped."""

    share: torch.Tensor  # [P] float64
    path_probability: torch.Tensor  # [P] float64
    truncated: torch.Tensor  # [P] int64: continuations that hit max_new_tokens
    p_target: torch.Tensor  # [P*N, max_new_tokens] float64: model's target mass per step (0 after the end)
    tokens: torch.Tensor  # [P*N, max_new_tokens]
    ages: torch.Tensor  # [P*N, max_new_tokens]
    hit: torch.Tensor  # [P*N] bool
    stop: torch.Tensor  # [P*N] int8, STOP_* codes


def prompt_uniforms(seeds: Sequence[int], n_samples: int, max_new_tokens: int) -> torch.Tensor:
    """[P*N, max_new_tokens, 2] uniforms, each prompt's from its own generator (target draw, token draw)."""
    draws = [
        torch.rand(
            n_samples, max_new_tokens, 2, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64
        )
        for seed in seeds
    ]
    return torch.cat(draws, dim=0)


@torch.no_grad()
def sample_trajectories_reference(
    model: EHRDecoder,
    tokens: torch.Tensor,
    ages: torch.Tensor,
    lengths: torch.Tensor,
    prs: torch.Tensor | None,
    has_prs: torch.Tensor | None,
    *,
    n_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    target_ids: Sequence[int] | torch.Tensor,
    gap_days: torch.Tensor,
    horizon_days: float,
    seeds: Sequence[int],
) -> Trajectories:
    """The first implementation of `sample_trajectories`, kept as its reference (exactness tests and the
    benchmark baseline): the prompt cache is copied once per continuation, grows by concatenation
    and is re-selected (with a host sync) whenever a continuation ends.

    tokens/ages [P, C] (right-padded, `lengths` real tokens each), gap_days [V] days a token moves
    the clock (0 for non-gap tokens), seeds one per prompt. A generated token's age is the prompt's
    last age plus the time elapsed so far (a gap token carries the age of the event it precedes).
    Elapsed time exactly at the horizon is still inside it.
    """
    prompts, vocab = tokens.shape[0], model.cfg.vocab_size
    if len(seeds) != prompts or n_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"need one seed per prompt ({len(seeds)} for {prompts}), n_samples and max_new_tokens >= 1")
    if gap_days.shape != (vocab,):
        raise ValueError(f"gap_days has shape {tuple(gap_days.shape)}, the model's vocabulary is {vocab}")
    device = tokens.device
    target = torch.zeros(vocab, dtype=torch.bool, device=device)
    target[torch.as_tensor(target_ids, dtype=torch.long, device=device)] = True
    if not target.any() or target[list(NEVER_GENERATED) + [EOS_ID]].any():
        raise ValueError("target_ids must name at least one code token (not PAD, BOS or EOS)")
    blocked = torch.zeros(vocab, dtype=torch.bool, device=device)
    blocked[list(NEVER_GENERATED)] = True
    gap_days = gap_days.to(device=device, dtype=torch.float64)

    was_training = model.training
    model.eval()
    logits, cache = model.prefill(tokens, ages, prs, has_prs, lengths=lengths)
    rows_total = prompts * n_samples
    replicate = torch.arange(prompts, device=device).repeat_interleave(n_samples)
    cache, logits = cache.select(replicate), logits.index_select(0, replicate)
    start_age = cache.last_age.to(torch.float64)
    uniforms = prompt_uniforms(seeds, n_samples, max_new_tokens).to(device)

    out_tokens = torch.full((rows_total, max_new_tokens), PAD_ID, dtype=torch.long, device=device)
    out_ages = torch.zeros((rows_total, max_new_tokens), dtype=torch.long, device=device)
    hit = torch.zeros(rows_total, dtype=torch.bool, device=device)
    stop = torch.full((rows_total,), RUNNING, dtype=torch.int8, device=device)
    p_steps = torch.zeros((rows_total, max_new_tokens), dtype=torch.float64, device=device)
    elapsed = torch.zeros(rows_total, dtype=torch.float64, device=device)
    live = torch.arange(rows_total, device=device)  # rows still being decoded, in cache order

    for step in range(max_new_tokens):
        scores = logits.float().masked_fill(blocked, float("-inf"))
        p_steps[live, step] = torch.softmax(scores, dim=-1)[:, target].sum(dim=-1).double()
        sampler = torch.softmax(filter_logits(scores, temperature, top_k, top_p), dim=-1)
        u = uniforms[live, step]
        hit[live] |= u[:, 0] < sampler[:, target].sum(dim=-1).double()
        rest = sampler.masked_fill(target, 0.0)
        best_rest = scores.masked_fill(target, float("-inf")).argmax(dim=-1)  # sampler left only targets
        nxt = torch.where(rest.sum(dim=-1) > 0, draw(rest, u[:, 1]), best_rest)

        elapsed[live] += gap_days[nxt]
        age = (start_age[live] + elapsed[live]).round().long()
        out_tokens[live, step], out_ages[live, step] = nxt, age
        crossed = elapsed[live] > horizon_days
        ended = crossed | (nxt == EOS_ID)
        stop[live[nxt == EOS_ID]] = STOP_EOS
        stop[live[crossed]] = STOP_HORIZON
        if step == max_new_tokens - 1:
            stop[live[~ended]] = STOP_TRUNCATED
            break
        if ended.any():
            keep = (~ended).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            live, nxt, age = live[keep], nxt[keep], age[keep]
            cache = cache.select(keep)
        logits = model.decode_step(nxt, age, cache)
    model.train(was_training)

    per_prompt = (prompts, n_samples)
    return Trajectories(
        share=hit.view(per_prompt).double().mean(dim=1),
        path_probability=path_probability(p_steps).view(per_prompt).mean(dim=1),
        truncated=(stop == STOP_TRUNCATED).view(per_prompt).sum(dim=1),
        p_target=p_steps,
        tokens=out_tokens,
        ages=out_ages,
        hit=hit,
        stop=stop,
    )


def _sampling_masks(vocab: int, target_ids, device) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.zeros(vocab, dtype=torch.bool, device=device)
    target[torch.as_tensor(target_ids, dtype=torch.long, device=device)] = True
    if not target.any() or target[list(NEVER_GENERATED) + [EOS_ID]].any():
        raise ValueError("target_ids must name at least one code token (not PAD, BOS or EOS)")
    blocked = torch.zeros(vocab, dtype=torch.bool, device=device)
    blocked[list(NEVER_GENERATED)] = True
    return target, blocked


@torch.no_grad()
def sample_trajectories(
    model: EHRDecoder,
    tokens: torch.Tensor,
    ages: torch.Tensor,
    lengths: torch.Tensor,
    prs: torch.Tensor | None,
    has_prs: torch.Tensor | None,
    *,
    n_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    target_ids: Sequence[int] | torch.Tensor,
    gap_days: torch.Tensor,
    horizon_days: float,
    seeds: Sequence[int],
    sync_every: int = 8,
    compact_below: float = 0.75,
) -> Trajectories:
    """Sample `n_samples` continuations of each right-padded prompt and score the target within the horizon.

    tokens/ages [P, C] (right-padded, `lengths` real tokens each), gap_days [V] days a token moves
    the clock (0 for non-gap tokens), seeds one per prompt. A generated token's age is the prompt's
    last age plus the time elapsed so far (a gap token carries the age of the event it precedes).
    Elapsed time exactly at the horizon is still inside it.

    Same draws and results as `sample_trajectories_reference`, computed differently: the prompt's
    keys/values are kept once per prompt and shared by its continuations (`SharedPrefixCache`,
    preallocated suffixes written in place); finished continuations are masked (their writes go to
    a scratch row) and the host looks at the batch only every `sync_every` steps, to stop when all
    have ended and to compact (`_regroup`: drop finished continuations, regroup the live ones of
    each prompt) when the new layout has at most `compact_below` of the current slots.
    """
    prompts, vocab = tokens.shape[0], model.cfg.vocab_size
    if len(seeds) != prompts or n_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"need one seed per prompt ({len(seeds)} for {prompts}), n_samples and max_new_tokens >= 1")
    if gap_days.shape != (vocab,):
        raise ValueError(f"gap_days has shape {tuple(gap_days.shape)}, the model's vocabulary is {vocab}")
    if sync_every < 1 or not 0.0 <= compact_below <= 1.0:
        raise ValueError(f"need sync_every >= 1 and 0 <= compact_below <= 1; got {sync_every}, {compact_below}")
    device = tokens.device
    target, blocked = _sampling_masks(vocab, target_ids, device)
    target_index = target.nonzero().squeeze(1)  # the same elements, in the same order, as target-mask indexing
    gap_days = gap_days.to(device=device, dtype=torch.float64)
    plain = temperature == 1.0 and top_k == 0 and top_p == 1.0  # the sampler is the model distribution

    was_training = model.training
    model.eval()
    logits, cache, last_age = model.prefill_shared(
        tokens, ages, prs, has_prs, lengths=lengths, futures=n_samples, capacity=max_new_tokens - 1
    )
    rows_total = scratch = prompts * n_samples  # row `scratch` takes the writes of finished slots
    logits = logits.repeat_interleave(n_samples, dim=0)
    start_age = last_age.to(torch.float64).repeat_interleave(n_samples)
    uniforms = torch.cat([prompt_uniforms(seeds, n_samples, max_new_tokens), torch.zeros(1, max_new_tokens, 2)])
    uniforms = uniforms.to(device=device, dtype=torch.float64)

    out_tokens = torch.full((rows_total + 1, max_new_tokens), PAD_ID, dtype=torch.long, device=device)
    out_ages = torch.zeros((rows_total + 1, max_new_tokens), dtype=torch.long, device=device)
    p_steps = torch.zeros((rows_total + 1, max_new_tokens), dtype=torch.float64, device=device)
    hit = torch.zeros(rows_total + 1, dtype=torch.bool, device=device)
    stop = torch.full((rows_total + 1,), RUNNING, dtype=torch.int8, device=device)
    # per slot (cache order, grouped by prompt): its row, whether it still runs, its clock and hit
    slot_row = torch.arange(rows_total, device=device)
    alive = torch.ones(rows_total, dtype=torch.bool, device=device)
    elapsed = torch.zeros(rows_total, dtype=torch.float64, device=device)
    slot_hit = torch.zeros(rows_total, dtype=torch.bool, device=device)
    group_prompt = list(range(prompts))  # the prompt of each group of slots in the cache (host side)
    held = cache.nbytes()
    sizes = (held["prefix"] // prompts, held["suffix"] // rows_total, held["prefix"] + held["suffix"])

    for step in range(max_new_tokens):
        rows = torch.where(alive, slot_row, scratch)
        scores = logits.float().masked_fill_(blocked, float("-inf"))  # in place: the logits are not used again
        probs = torch.softmax(scores, dim=-1)
        p_target = probs.index_select(1, target_index).sum(dim=-1).double()
        p_steps[rows, step] = p_target
        sampler = probs if plain else torch.softmax(filter_logits(scores, temperature, top_k, top_p), dim=-1)
        u = uniforms[slot_row, step]
        sampler_target = p_target if plain else sampler.index_select(1, target_index).sum(dim=-1).double()
        slot_hit |= u[:, 0] < sampler_target
        rest = sampler.masked_fill_(target, 0.0)
        best_rest = scores.masked_fill_(target, float("-inf")).max(dim=-1).indices  # sampler left only targets
        nxt = torch.where(rest.sum(dim=-1) > 0, _draw(rest, u[:, 1]), best_rest)

        elapsed += gap_days[nxt]
        age = (start_age + elapsed).round().long()
        code = torch.where(nxt == EOS_ID, STOP_EOS, RUNNING)
        code = torch.where(elapsed > horizon_days, STOP_HORIZON, code)
        if step == max_new_tokens - 1:
            code = torch.where(code == RUNNING, STOP_TRUNCATED, code)
        out_tokens[rows, step], out_ages[rows, step] = nxt, age
        hit[rows] = slot_hit
        stop[rows] = code.to(torch.int8)
        alive &= code == RUNNING
        if step == max_new_tokens - 1:
            break
        if (step + 1) % sync_every == 0:  # the only host sync of the loop
            plan = _regroup(alive.tolist(), group_prompt, cache.futures, compact_below, *sizes)
            if plan is None:
                break  # every continuation has ended
            if plan is not True:
                groups, slots, group_prompt, futures, flags = plan
                groups = None if groups is None else torch.tensor(groups, device=device)
                slots = torch.tensor(slots, device=device)
                cache = cache.compact(groups, slots, futures)
                slot_row, elapsed, slot_hit, start_age, nxt, age = (
                    t.index_select(0, slots) for t in (slot_row, elapsed, slot_hit, start_age, nxt, age)
                )
                alive = torch.tensor(flags, dtype=torch.bool, device=device)
        logits = model.decode_shared(nxt, age, cache)
    model.train(was_training)

    per_prompt = (prompts, n_samples)
    hit, stop, p_steps = hit[:rows_total], stop[:rows_total], p_steps[:rows_total]
    return Trajectories(
        share=hit.view(per_prompt).double().mean(dim=1),
        path_probability=path_probability(p_steps).view(per_prompt).mean(dim=1),
        truncated=(stop == STOP_TRUNCATED).view(per_prompt).sum(dim=1),
        p_target=p_steps,
        tokens=out_tokens[:rows_total],
        ages=out_ages[:rows_total],
        hit=hit,
        stop=stop,
    )


DRAW_BLOCK = 64  # vocabulary block of the two-level inverse CDF (or a divisor of the vocabulary up to twice it)


def _draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """`draw` in two levels: the float64 CDF over blocks of DRAW_BLOCK tokens (one vectorised
    reduction) finds the block, a CDF inside that block only finds the token. The float32 weights
    sum exactly in float64 down to ~2^-29 of the total, so the CDF agrees with `draw`'s sequential
    one to ~1e-16 and the same uniform picks the same token (the same clamp to the last positive
    weight applies when u * total rounds to the total)."""
    rows, vocab = weights.shape
    size = next((b for b in range(DRAW_BLOCK, 2 * DRAW_BLOCK + 1) if vocab % b == 0), DRAW_BLOCK)  # no padding copy
    blocks = -(-vocab // size)
    padded = weights if blocks * size == vocab else torch.nn.functional.pad(weights, (0, blocks * size - vocab))
    padded = padded.view(rows, blocks, size)
    block_cdf = padded.sum(dim=-1, dtype=torch.float64).cumsum(dim=-1)  # [rows, blocks]
    x = (uniforms * block_cdf[:, -1])[:, None].contiguous()
    block = torch.searchsorted(block_cdf, x, right=True).squeeze(1).clamp_(max=blocks - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)[:, None]).squeeze(1), 0.0)
    inside = padded[torch.arange(rows, device=weights.device), block]  # [rows, DRAW_BLOCK]
    cdf = before[:, None] + inside.cumsum(dim=-1, dtype=torch.float64)
    picked = block * size + torch.searchsorted(cdf, x, right=True).squeeze(1)
    # the last positive weight: in the last block with a positive sum, its last positive entry
    block_sums = padded.sum(dim=-1)
    last_block = blocks - 1 - (block_sums > 0).flip(-1).to(torch.uint8).argmax(dim=-1)
    tail = padded[torch.arange(rows, device=weights.device), last_block] > 0
    last_positive = last_block * size + size - 1 - tail.flip(-1).to(torch.uint8).argmax(dim=-1)
    return torch.minimum(picked, last_positive.clamp(max=vocab - 1))


GROUP_GROWTH = 1.5  # a compaction may make at most this many times the current groups


def _regroup(
    alive: list[bool],
    group_prompt: list[int],
    futures: int,
    compact_below: float,
    group_bytes: int = 0,
    slot_bytes: int = 0,
    budget: float = float("inf"),
):
    """The compaction plan at a sync point: None when no continuation runs; True to keep the layout;
    else (old group per new group or None for the same groups, old slot per new slot, prompt per
    new group, new group size, new alive flags).

    Each prompt's live continuations are regrouped in groups of the size that leaves the fewest
    slots (padding included) among those whose cache, `group_bytes` per group (the prompt's
    keys/values, one copy per group) plus `slot_bytes` per slot, stays within `budget` (the first
    allocation: memory never grows); the layout changes only when the new one has at most
    `compact_below` of the current slots.
    """
    groups_now = len(group_prompt)
    live: dict[int, list[int]] = {}
    source: dict[int, int] = {}
    for group, prompt in enumerate(group_prompt):
        source.setdefault(prompt, group)
        for slot in range(group * futures, (group + 1) * futures):
            if alive[slot]:
                live.setdefault(prompt, []).append(slot)
    if not live:
        return None

    def groups_of(n):
        return sum(-(-len(v) // n) for v in live.values())

    fits = [
        n
        for n in range(1, futures + 1)
        if groups_of(n) <= groups_now * GROUP_GROWTH and groups_of(n) * (group_bytes + n * slot_bytes) <= budget
    ]
    size = min(fits or [futures], key=lambda n: (groups_of(n) * n, -n))  # fewest slots, then fewest groups
    new_groups = groups_of(size)
    if new_groups * size > compact_below * len(alive):
        return True
    groups, slots, prompts, flags = [], [], [], []
    for prompt in sorted(live):
        members = live[prompt]
        for start in range(0, len(members), size):
            chunk = members[start : start + size]
            groups.append(source[prompt])
            prompts.append(prompt)
            slots += chunk + [chunk[0]] * (size - len(chunk))  # padding: a finished copy, masked
            flags += [True] * len(chunk) + [False] * (size - len(chunk))
    same_groups = groups == list(range(groups_now))
    return (None if same_groups else groups), slots, prompts, size, flags
