"""GPT-style decoder over event tokens, with age embeddings and PRS fusion (none / prefix / cross).

Pre-norm blocks (RMSNorm), rotary position embeddings on q/k, SDPA attention with `is_causal`
(flash/efficient kernels on GPU), GELU MLP, input and output embeddings tied. Padding is on the
right, so causal attention never lets a real token see a pad and no padding mask is needed in
attention; pads are excluded from the loss instead. Packed rows (several persons per row) use
document masking instead (model/packing.py), and the loss can skip the full logits
(model/loss.py). Nothing here knows about Ray or DeepSpeed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ehrfm.constants import PAD_ID
from ehrfm.model.config import ModelConfig
from ehrfm.model.loss import OutputHead
from ehrfm.model.packing import Backend, DocumentMask, cross_memory_mask
from ehrfm.model.prs import CrossMemory, GatedCrossAttention, PRSEncoder

DAYS_PER_YEAR = 365.25


def rotary_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, head_dim/2] (or [B, T, head_dim/2] for per-row positions [B, T]) in fp32, computed
    from scratch (no buffer, so bf16 casts cannot blur them)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head by the position angle; x is [B, nh, T, hd].

    In fp32 when the tables are fp32 (x is upcast); in x's dtype when the tables already are (bf16
    training: no per-layer copies of q and k to fp32 and back)."""
    first, second = (x if x.dtype == cos.dtype else x.float()).chunk(2, dim=-1)
    rotated = torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return rotated.to(x.dtype)


def _tables_in_compute_dtype(rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor):
    """The rotary tables cast once per forward to the dtype q/k will have (bf16 weights or bf16
    autocast); fp32 activations keep them fp32, so CPU results are unchanged."""
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    if dtype in (torch.bfloat16, torch.float16):
        return rope[0].to(dtype), rope[1].to(dtype)
    return rope


@dataclass
class KVCache:
    """Keys/values of every layer for incremental decoding, plus the PRS memory of the batch.

    A cache prefilled from right-padded prompts of different lengths also keeps `key_valid`
    (False at the padding, which later tokens must not attend to) and `positions` (each row's
    next rotary position), so every row decodes exactly as its unpadded prompt would alone.
    """

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    length: int = 0
    memory: tuple[torch.Tensor, torch.Tensor] | None = None  # cross fusion: (tokens, visible)
    last_age: torch.Tensor | None = field(default=None)
    key_valid: torch.Tensor | None = None  # [B, length] bool; None: every cached key is real
    positions: torch.Tensor | None = None  # [B] rotary position of the next token; None: `length`

    @classmethod
    def empty(cls, layers: int) -> KVCache:
        return cls(keys=[None] * layers, values=[None] * layers)

    def select(self, rows: torch.Tensor) -> KVCache:
        """The cache of batch rows `rows` (a row may repeat: one prompt, several continuations)."""

        def take(t):
            return None if t is None else t.index_select(0, rows)

        memory = None if self.memory is None else (take(self.memory[0]), take(self.memory[1]))
        return KVCache(
            [take(k) for k in self.keys],
            [take(v) for v in self.values],
            self.length,
            memory,
            take(self.last_age),
            take(self.key_valid),
            take(self.positions),
        )


@dataclass
class SharedPrefixCache:
    """KV cache for sampling `futures` continuations per prompt without copying the prompt.

    The prompt's keys/values (`prefix_keys`/`prefix_values`, [P, nh, L, hd] per layer) are kept
    once per prompt; each continuation ("slot", s = prompt * futures + i) owns a preallocated
    suffix ([S, nh, capacity, hd] per layer) written in place, one position per decode step.
    Attention of a new token runs over both parts and is combined by log-sum-exp, so memory for N
    futures is one prompt plus N suffixes. Cross fusion keeps the PRS memory's keys/values per
    prompt and layer (computed once at prefill). Slots come in groups of `futures` that share one
    prompt part; `compact` regroups the live continuations (one bulk copy at a sync point, never
    per step), and a prompt may then span several groups (never more groups than at prefill).
    """

    prefix_keys: list[torch.Tensor]
    prefix_values: list[torch.Tensor]
    key_valid: torch.Tensor  # [P, L] bool: False at the prompt padding
    key_bias: torch.Tensor  # [P, 1, 1, L] fp32: 0 at real keys, -inf at the padding (added to the scores)
    positions: torch.Tensor  # [P] rotary position of the first generated token
    suffix_keys: list[torch.Tensor]
    suffix_values: list[torch.Tensor]
    futures: int  # slots per group (N at prefill, fewer after compaction)
    cross: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    steps: int = 0  # suffix positions written so far (shared by every slot)

    @property
    def prompts(self) -> int:
        return self.key_valid.shape[0]

    @property
    def capacity(self) -> int:
        return self.suffix_keys[0].shape[2] if self.suffix_keys else 0

    def compact(self, groups: torch.Tensor | None, slots: torch.Tensor, futures: int) -> SharedPrefixCache:
        """A new layout of `futures` slots per group: `groups` [G'] the old group whose prompt each new
        group holds (None: the same groups), `slots` [G' * futures] the old slot each new slot takes
        over; one bulk copy of the suffixes (and of the groups' prompt keys/values)."""

        def by_prompt(t):
            return t if groups is None else t.index_select(0, groups)

        cross = {layer: tuple(by_prompt(t) for t in kv) for layer, kv in self.cross.items()}
        return SharedPrefixCache(
            [by_prompt(k) for k in self.prefix_keys],
            [by_prompt(v) for v in self.prefix_values],
            by_prompt(self.key_valid),
            by_prompt(self.key_bias),
            by_prompt(self.positions),
            [k.index_select(0, slots) for k in self.suffix_keys],
            [v.index_select(0, slots) for v in self.suffix_values],
            futures,
            cross,
            self.steps,
        )

    def nbytes(self) -> dict[str, int]:
        """Bytes held by the shared prompt part and by the per-continuation suffixes."""

        def size(ts):
            return sum(t.numel() * t.element_size() for t in ts)

        cross = [t for kv in self.cross.values() for t in kv]
        return {
            "prefix": size(self.prefix_keys) + size(self.prefix_values) + size(cross),
            "suffix": size(self.suffix_keys) + size(self.suffix_values),
        }


# The fused SDPA kernel that also returns the log-sum-exp (CPU build); without it, plain matmuls.
_FLASH_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attention_with_lse(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, fused: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(d) + bias) v [B, nh, Q, hd] and the log-sum-exp of the scores [B, nh, Q, 1]
    (fp32): the fused SDPA kernel where it gives the log-sum-exp, else matmuls."""
    if fused:
        out, lse = _FLASH_WITH_LSE(q, keys, values, attn_mask=bias)
        return out, lse.unsqueeze(-1)
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * (1.0 / math.sqrt(q.shape[-1]))
    if bias is not None:
        scores = scores + bias
    top = scores.amax(dim=-1, keepdim=True)
    weights = torch.exp(scores - top)
    total = weights.sum(dim=-1, keepdim=True)
    out = torch.matmul(weights.to(values.dtype), values).float() / total
    return out, top + total.log()


def shared_prefix_attention(
    q: torch.Tensor, cache: SharedPrefixCache, layer: int, futures: int, length: int, fused: bool | None = None
) -> torch.Tensor:
    """Attention of one new query per slot ([S, nh, 1, hd]) over its group's prompt keys and its own
    first `length` suffix keys: each part by SDPA with its log-sum-exp, combined by those (fp32);
    returns [S, nh, 1, hd]. `fused` None: the fused kernel on CPU when this torch has it."""
    if fused is None:
        fused = _FLASH_WITH_LSE is not None and q.device.type == "cpu" and q.dtype == cache.key_bias.dtype
    slots, heads, _, head_dim = q.shape
    groups = slots // futures
    # prompt part: the N queries of a group share its keys -> one [N, L] score block per group and head
    grouped = q.view(groups, futures, heads, head_dim).transpose(1, 2)  # [G, nh, N, hd]
    pre_out, pre_lse = _attention_with_lse(
        grouped, cache.prefix_keys[layer], cache.prefix_values[layer], cache.key_bias, fused
    )

    def per_slot(t):  # [G, nh, N, d] -> [S, nh, 1, d]
        return t.transpose(1, 2).reshape(slots, heads, 1, t.shape[-1])

    pre_out, pre_lse = per_slot(pre_out.float()), per_slot(pre_lse)
    # own part: the slot's generated tokens so far (all real, all before the query)
    keys, values = cache.suffix_keys[layer][:, :, :length], cache.suffix_values[layer][:, :, :length]
    own_out, own_lse = _attention_with_lse(q, keys, values, None, fused)
    top = torch.maximum(pre_lse, own_lse)
    w_pre, w_own = torch.exp(pre_lse - top), torch.exp(own_lse - top)
    out = (pre_out * w_pre + own_out.float() * w_own) / (w_pre + w_own)
    return out.to(q.dtype)


class AgeEmbedding(nn.Module):
    """Age in days -> hidden: sinusoids with periods from a week to 200 years, plus age/100y, projected."""

    def __init__(self, frequencies: int, hidden: int):
        super().__init__()
        self.frequencies = frequencies
        self.proj = nn.Linear(2 * frequencies + 1, hidden, bias=False)

    def forward(self, ages: torch.Tensor) -> torch.Tensor:
        days = ages.to(torch.float32)
        periods = torch.logspace(
            math.log10(7.0), math.log10(200 * DAYS_PER_YEAR), self.frequencies, device=ages.device, dtype=torch.float32
        )
        angles = days[..., None] * (2 * math.pi / periods)
        linear = (days / (100 * DAYS_PER_YEAR))[..., None]
        features = torch.cat([angles.sin(), angles.cos(), linear], dim=-1)
        return self.proj(features.to(self.proj.weight.dtype))


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.head_dim, self.rope_base = cfg.heads, cfg.head_dim, cfg.rope_base
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=False)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
        layer: int = 0,
        mask: DocumentMask | None = None,
    ) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        start = 0
        if cache is not None:
            start = cache.length
            if cache.keys[layer] is not None:
                k = torch.cat([cache.keys[layer], k], dim=2)
                v = torch.cat([cache.values[layer], v], dim=2)
            cache.keys[layer], cache.values[layer] = k, v
        dropout = self.dropout if self.training else 0.0
        if mask is not None:  # packed rows: causal within each person's segment
            out = mask.attend(q, k, v, dropout)
        elif start == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:  # new queries at positions start.. attend to every cached key up to their own position
            key_pos = torch.arange(k.shape[2], device=x.device)
            query_pos = start + torch.arange(length, device=x.device)
            mask = key_pos[None, :] <= query_pos[:, None]
            if cache.key_valid is not None:  # ragged prompts: padding between prompt and new tokens
                mask = mask[None, None] & cache.key_valid[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.proj(out.transpose(1, 2).reshape(batch, length, hidden))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width = int(cfg.mlp_ratio * cfg.hidden)
        self.fc = nn.Linear(cfg.hidden, width, bias=False)
        self.proj = nn.Linear(width, cfg.hidden, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm: x += attn(norm(x)); [x = gated cross-attn(x, PRS)]; x += mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, cross: bool):
        super().__init__()
        self.norm_attn = nn.RMSNorm(cfg.hidden)
        self.attn = SelfAttention(cfg)
        self.cross = GatedCrossAttention(cfg) if cross else None
        self.norm_mlp = nn.RMSNorm(cfg.hidden)
        self.mlp = MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, memory=None, cache=None, layer=0, mask=None):
        x = x + self.resid_dropout(self.attn(self.norm_attn(x), rope, cache, layer, mask))
        if self.cross is not None:
            x = self.cross(x, *memory)
        return x + self.mlp(self.norm_mlp(x))


class EHRDecoder(nn.Module):
    """Next-event-token model over timelines, optionally conditioned on a PRS vector.

    Inputs: tokens [B, T] int, ages [B, T] int (days), prs [B, K] float, has_prs [B] bool.
    `forward` gives (logits, loss), also for packed rows (several persons per row, see
    `forward`); `hidden_states` the representation at chosen positions; `prefill` /
    `decode_step` run generation with a KV cache.
    """

    # self-attention of packed rows: "auto" = FlexAttention on CUDA, dense-mask SDPA elsewhere
    attention_backend: Backend = "auto"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model config has no vocab_size; fill it from the data manifest (ModelConfig.with_data)")
        if cfg.fusion != "none" and cfg.num_pgs <= 0:
            raise ValueError(f"fusion '{cfg.fusion}' needs num_pgs > 0")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.age_emb = AgeEmbedding(cfg.age_frequencies, cfg.hidden)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.prs_encoder = PRSEncoder(cfg) if cfg.fusion != "none" else None
        self.cross_memory = CrossMemory(cfg) if cfg.fusion == "cross" else None
        cross = set(cfg.cross_layers())
        self.blocks = nn.ModuleList(Block(cfg, i in cross) for i in range(cfg.layers))
        self.norm_out = nn.RMSNorm(cfg.hidden)
        self.lm_head = OutputHead(cfg.hidden, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied; used through lm_head so ZeRO-3 gathers it
        self.apply(self._init_weights)
        residual_std = cfg.init_std / math.sqrt(2 * cfg.layers)
        for name, param in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight", "cross.proj.weight")):
                nn.init.normal_(param, mean=0.0, std=residual_std)
        if self.prs_encoder is not None:
            nn.init.normal_(self.prs_encoder.missing, mean=0.0, std=cfg.init_std)
        if self.cross_memory is not None:
            nn.init.normal_(self.cross_memory.null, mean=0.0, std=cfg.init_std)
        if cfg.adapter:
            self.freeze_base()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    # ---- parameters ---------------------------------------------------------------------------
    def prs_parameter_names(self) -> list[str]:
        """Parameters that belong to the PRS modality (what adapter mode trains)."""
        prefixes = ("prs_encoder.", "cross_memory.")
        return [n for n, _ in self.named_parameters() if n.startswith(prefixes) or ".cross." in n]

    def freeze_base(self) -> None:
        """Adapter mode: only the PRS encoder and cross-attention blocks stay trainable."""
        trainable = set(self.prs_parameter_names())
        for name, param in self.named_parameters():
            param.requires_grad = name in trainable

    def load_base_weights(self, state_dict: dict[str, torch.Tensor]) -> list[str]:
        """Load an EHR-only model into this (possibly PRS-fused) one; returns the PRS keys left new.

        Every key of `state_dict` must exist here, and every key missing from it must be a PRS
        parameter, so a wrong or partial checkpoint fails instead of training from noise.
        """
        result = self.load_state_dict(state_dict, strict=False)
        prs = set(self.prs_parameter_names())
        not_prs = [k for k in result.missing_keys if k not in prs and k != "lm_head.weight"]
        if result.unexpected_keys or not_prs:
            raise ValueError(
                f"base checkpoint does not fit this model: unexpected {result.unexpected_keys[:5]}, "
                f"missing non-PRS {not_prs[:5]}"
            )
        return sorted(k for k in result.missing_keys if k in prs)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ---- forward ------------------------------------------------------------------------------
    def _prs_inputs(self, batch: int, prs, has_prs, device):
        """PRS soft tokens (prefix) or cross-attention memory; zeros/missing when no PRS is given."""
        if self.prs_encoder is None:
            return None, None
        if prs is None:
            prs = torch.zeros(batch, self.cfg.num_pgs, device=device)
            has_prs = torch.zeros(batch, dtype=torch.bool, device=device)
        soft, has_prs = self.prs_encoder(prs, has_prs)
        if self.cross_memory is not None:
            return None, self.cross_memory(soft, has_prs)
        return soft, None

    def _trunk(self, tokens, ages, prs=None, has_prs=None, cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states of the event positions [B, T, H] (prefix positions dropped)."""
        x = self.tok_emb(tokens) + self.age_emb(ages)
        start = cache.length if cache is not None else 0
        prefix, memory = None, None
        if cache is None or start == 0:
            prefix, memory = self._prs_inputs(tokens.shape[0], prs, has_prs, tokens.device)
            if cache is not None:
                cache.memory = memory
        else:
            memory = cache.memory
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        x = self.emb_dropout(x)
        steps = torch.arange(x.shape[1], device=x.device)
        if cache is not None and cache.positions is not None:  # per-row positions [B, T]
            cos, sin = rotary_tables(cache.positions[:, None] + steps, self.cfg.head_dim, self.cfg.rope_base)
            rope = (cos[:, None], sin[:, None])
            cache.key_valid = torch.cat([cache.key_valid, cache.key_valid.new_ones(x.shape[0], x.shape[1])], dim=1)
            cache.positions = cache.positions + x.shape[1]
        else:
            rope = rotary_tables(start + steps, self.cfg.head_dim, self.cfg.rope_base)
            if cache is None:  # generation keeps fp32 tables (prefill and decode steps must agree)
                rope = _tables_in_compute_dtype(rope, x)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, memory, cache, layer)
        if cache is not None:
            cache.length = start + x.shape[1]
        if prefix is not None:
            x = x[:, prefix.shape[1] :]
        return self.norm_out(x)

    def _packed_trunk(self, tokens, ages, prs, has_prs, segment, positions, prefix_slot) -> torch.Tensor:
        """Final-normed hidden states [R, L, H] of packed rows, prefix slots included.

        Each person's PRS soft token j replaces the embedding at its prefix slot j (prefix fusion),
        or its cross-attention memory is visible to its own positions only (cross fusion);
        self-attention is causal within each segment; rotary angles come from `positions`.
        """
        x = self.tok_emb(tokens) + self.age_emb(ages)
        persons = prs.shape[0] if prs is not None else int(segment.max().item()) + 1
        prefix, memory = self._prs_inputs(persons, prs, has_prs, tokens.device)
        if prefix is not None:
            if prefix_slot is None:
                raise ValueError("a packed batch for prefix fusion needs prefix_slot (where the PRS tokens go)")
            slot = prefix_slot.clamp(min=0)
            soft = prefix[segment.clamp(min=0), slot.clamp(max=prefix.shape[1] - 1)]  # [R, L, H]
            x = torch.where((prefix_slot >= 0)[..., None], soft.to(x.dtype), x)
        if memory is not None:
            memory = (memory[0], cross_memory_mask(segment, memory[1]))
        x = self.emb_dropout(x)
        cos, sin = rotary_tables(positions, self.cfg.head_dim, self.cfg.rope_base)
        rope = _tables_in_compute_dtype((cos[:, None], sin[:, None]), x)
        mask = DocumentMask.build(segment, self.attention_backend)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, memory, None, layer, mask)
        return self.norm_out(x)

    def forward(
        self,
        tokens: torch.Tensor,
        ages: torch.Tensor,
        prs: torch.Tensor | None = None,
        has_prs: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        *,
        segment: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        prefix_slot: torch.Tensor | None = None,
        loss_chunk: int = 0,
        reduction: str = "mean",
    ):
        """(logits [B, T, V] or None, next-token loss over non-pad targets or None).

        Unpacked: tokens/ages/targets [B, T], prs [B, K]. Packed: tokens/ages/targets [R, L] holding
        N persons' segments, `segment` [R, L] (person index, -1 at padding), `positions` [R, L]
        (rotary position inside the segment), `prefix_slot` [R, L] (j at a segment's j-th prefix
        slot, else -1), prs [N, K]; every position's hidden state is computed (prefix slots and
        padding have PAD targets). `loss_chunk` > 0: the fused linear + cross-entropy over chunks
        of that many real targets (logits never materialised, returned as None). `reduction`
        "mean" (per real target) or "sum". A batch with no real target has loss 0, not NaN.
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if segment is not None or positions is not None or prefix_slot is not None:
            if segment is None or positions is None:
                raise ValueError("a packed batch needs both segment and positions")
            hidden = self._packed_trunk(tokens, ages, prs, has_prs, segment, positions, prefix_slot)
        else:
            hidden = self._trunk(tokens, ages, prs, has_prs)
        if targets is not None and loss_chunk > 0:
            return None, self.lm_head(hidden, targets, loss_chunk, reduction)
        logits = self.lm_head(hidden)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten().long(), ignore_index=PAD_ID, reduction="sum"
            )
            if reduction == "mean":
                loss = loss / (targets != PAD_ID).sum().clamp(min=1)
        return logits, loss

    def encode(self, tokens, ages, prs=None, has_prs=None) -> torch.Tensor:
        """Final-normed hidden states [B, T, H] of the event positions, with gradients (fine-tuning)."""
        return self._trunk(tokens, ages, prs, has_prs)

    def prs_summary(self, prs: torch.Tensor, has_prs: torch.Tensor) -> torch.Tensor:
        """Mean of the PRS soft tokens [B, H] (the learned missing tokens where has_prs is false)."""
        if self.prs_encoder is None:
            raise ValueError("this model has no PRS modality (fusion 'none')")
        soft, _ = self.prs_encoder(prs, has_prs)
        return soft.mean(dim=1)

    @torch.no_grad()
    def hidden_states(self, tokens, ages, prs=None, has_prs=None, positions: torch.Tensor | None = None):
        """Representation [B, T, H], or [B, P, H] at `positions` [B, P] (e.g. each prediction time)."""
        hidden = self._trunk(tokens, ages, prs, has_prs)
        if positions is None:
            return hidden
        index = positions.long().unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return hidden.gather(1, index)

    def next_token_logits(self, tokens, ages, prs=None, has_prs=None, lengths: torch.Tensor | None = None):
        """Logits [B, V] for the token after each sequence (after position lengths-1 when right-padded)."""
        hidden = self._trunk(tokens, ages, prs, has_prs)
        if lengths is None:
            last = hidden[:, -1]
        else:
            last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths.long() - 1]
        return self.lm_head(last)

    # ---- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(
        self, tokens, ages, prs=None, has_prs=None, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        """Run a prompt, keep its keys/values; returns (last-position logits [B, V], cache).

        With `lengths` the prompts are right-padded and each row's logits are those after its
        last real token; the cache then masks the padding for every later step.
        """
        cache = KVCache.empty(self.cfg.layers)
        hidden = self._trunk(tokens, ages, prs, has_prs, cache)
        if lengths is None:
            cache.last_age = ages[:, -1]
            return self.lm_head(hidden[:, -1]), cache
        rows, last = torch.arange(tokens.shape[0], device=tokens.device), lengths.long() - 1
        prefix = cache.length - tokens.shape[1]
        cache.key_valid = torch.arange(cache.length, device=tokens.device)[None, :] < (prefix + last + 1)[:, None]
        cache.positions = prefix + last + 1
        cache.last_age = ages[rows, last]
        return self.lm_head(hidden[rows, last]), cache

    @torch.no_grad()
    def prefill_shared(
        self, tokens, ages, prs=None, has_prs=None, lengths: torch.Tensor | None = None, *, futures: int, capacity: int
    ) -> tuple[torch.Tensor, SharedPrefixCache, torch.Tensor]:
        """`prefill` for sampling: the prompts' keys/values once per prompt, and a preallocated suffix
        of `capacity` positions for each of `futures` continuations per prompt (in the model's dtype
        and device). Returns (last-position logits [P, V], cache, last real age [P])."""
        logits, cache = self.prefill(tokens, ages, prs, has_prs, lengths=lengths)
        prompts, length = tokens.shape[0], cache.length
        device = tokens.device
        key_valid = cache.key_valid
        if key_valid is None:
            key_valid = torch.ones(prompts, length, dtype=torch.bool, device=device)
        positions = cache.positions
        if positions is None:
            positions = torch.full((prompts,), length, dtype=torch.long, device=device)
        keys = [k.contiguous() for k in cache.keys]  # the qkv split leaves them strided
        values = [v.contiguous() for v in cache.values]
        key_bias = torch.zeros(key_valid.shape, dtype=torch.float32, device=device)
        key_bias = key_bias.masked_fill(~key_valid, float("-inf"))[:, None, None, :]
        shape = (prompts * futures, self.cfg.heads, max(capacity, 1), self.cfg.head_dim)
        suffix_keys = [torch.empty(shape, dtype=k.dtype, device=device) for k in cache.keys]
        suffix_values = [torch.empty(shape, dtype=v.dtype, device=device) for v in values]
        cross = {}
        if cache.memory is not None:
            memory, visible = cache.memory
            for layer, block in enumerate(self.blocks):
                if block.cross is None:
                    continue
                hidden = self.cfg.hidden
                mem = memory.to(block.cross.kv.weight.dtype)
                k, v = block.cross.kv(mem).split(hidden, dim=2)
                k = k.view(prompts, -1, self.cfg.heads, self.cfg.head_dim).transpose(1, 2).contiguous()
                v = v.view(prompts, -1, self.cfg.heads, self.cfg.head_dim).transpose(1, 2).contiguous()
                cross[layer] = (k, v, visible)
        shared = SharedPrefixCache(
            keys, values, key_valid, key_bias, positions, suffix_keys, suffix_values, futures, cross, steps=0
        )
        return logits, shared, cache.last_age

    @torch.no_grad()
    def decode_shared(self, token: torch.Tensor, age: torch.Tensor, cache: SharedPrefixCache) -> torch.Tensor:
        """One new token per slot ([S] ids and ages, S = prompts x futures, grouped by prompt) ->
        logits [S, V]; its keys/values are written in place at suffix position `cache.steps`.

        No host synchronisation: every shape follows from the cache's Python-side counters.
        """
        if self.training:
            raise RuntimeError("decode_shared is for inference (eval mode, no dropout)")
        step = cache.steps
        if step >= cache.capacity:
            raise ValueError(f"suffix cache full ({cache.capacity} positions)")
        futures, slots = cache.futures, token.shape[0]
        heads, head_dim, hidden = self.cfg.heads, self.cfg.head_dim, self.cfg.hidden
        x = (self.tok_emb(token) + self.age_emb(age))[:, None]  # [S, 1, H]
        positions = (cache.positions + step).repeat_interleave(futures)  # [S]
        cos, sin = rotary_tables(positions[:, None], head_dim, self.cfg.rope_base)
        rope = (cos[:, None], sin[:, None])
        for layer, block in enumerate(self.blocks):
            attn = block.attn
            qkv = attn.qkv(block.norm_attn(x)).view(slots, 1, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
            (q, k), v = apply_rotary(qkv[:2], *rope), qkv[2]  # q and k rotated in one go
            cache.suffix_keys[layer][:, :, step] = k[:, :, 0]
            cache.suffix_values[layer][:, :, step] = v[:, :, 0]
            out = shared_prefix_attention(q, cache, layer, futures, step + 1)
            x = x + attn.proj(out.transpose(1, 2).reshape(slots, 1, hidden))
            if block.cross is not None:
                cross = block.cross
                mem_k, mem_v, visible = cache.cross[layer]
                cq = cross.q(cross.norm(x)).view(slots // futures, futures, heads, head_dim).transpose(1, 2)
                cout = F.scaled_dot_product_attention(cq, mem_k, mem_v, attn_mask=visible[:, None, None, :])
                cout = cross.proj(cout.transpose(1, 2).reshape(slots, 1, hidden))
                x = x + torch.tanh(cross.gate).to(x.dtype) * cout
            x = x + block.mlp(block.norm_mlp(x))
        cache.steps = step + 1
        return self.lm_head(self.norm_out(x)[:, -1])

    @torch.no_grad()
    def decode_step(self, token: torch.Tensor, age: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per sequence ([B] ids and ages) -> logits [B, V] for the next one."""
        hidden = self._trunk(token[:, None], age[:, None], cache=cache)
        cache.last_age = age
        return self.lm_head(hidden[:, -1])
