"""Attention masks for packed rows: several persons' segments in one row, none seeing another.

A packed row carries `segment` ids (the person each position belongs to, -1 at padding). Self-
attention is causal within a segment (document masking); cross-attention to the PRS memory of
all persons is restricted to the query's own person. One predicate (`same_document_causal`)
defines the self-attention mask for both backends: a dense boolean mask for
`scaled_dot_product_attention` (exact reference, CPU) and a FlexAttention block mask (GPU), whose
blocks that hold no allowed pair are skipped. Padding positions see themselves (and earlier
padding), never a person, so no query row is fully masked (that would give NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "sdpa", "flex", "flex-eager"]  # flex-eager: uncompiled reference (tests)

_compiled_flex = None


def same_document_causal(seg_q: torch.Tensor, seg_k: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor):
    """True where a query may attend to a key: same segment (person or padding), key not after it."""
    return (seg_q == seg_k) & (kv_idx <= q_idx)


def dense_document_mask(segment: torch.Tensor) -> torch.Tensor:
    """Boolean mask [R, 1, L, L] for SDPA from segment ids [R, L]."""
    idx = torch.arange(segment.shape[1], device=segment.device)
    return same_document_causal(segment[:, :, None], segment[:, None, :], idx[:, None], idx[None, :])[:, None]


def _flex_attention():
    """flex_attention, compiled once (eager flex is an unfused reference; compiled it is a fused kernel)."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention)  # default dynamism: row counts vary per batch
    return _compiled_flex


@torch.compiler.disable  # built eagerly once per forward; the compiled model receives the BlockMask
def flex_block_mask(segment: torch.Tensor):
    """FlexAttention BlockMask for segment ids [R, L] (same predicate as the dense mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return same_document_causal(segment[b, q_idx], segment[b, kv_idx], q_idx, kv_idx)

    rows, length = segment.shape
    return create_block_mask(mask_mod, rows, None, length, length, device=segment.device)


@dataclass
class DocumentMask:
    """The self-attention mask of one packed forward, built once and used by every layer."""

    segment: torch.Tensor  # [R, L] person index, -1 at padding
    dense: torch.Tensor | None = None  # [R, 1, L, L] bool (SDPA)
    block: object | None = None  # FlexAttention BlockMask
    compiled: bool = True  # flex: the compiled kernel (False: the eager reference)

    @classmethod
    def build(cls, segment: torch.Tensor, backend: Backend = "auto") -> DocumentMask:
        """`auto`: FlexAttention on CUDA, dense SDPA mask elsewhere."""
        if backend not in ("auto", "sdpa", "flex", "flex-eager"):
            raise ValueError(f"attention backend must be auto, sdpa, flex or flex-eager, got {backend!r}")
        if backend.startswith("flex") or (backend == "auto" and segment.is_cuda):
            return cls(segment, block=flex_block_mask(segment), compiled=backend != "flex-eager")
        return cls(segment, dense=dense_document_mask(segment))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
        """Attention [R, nh, L, hd]; with dropout (not in FlexAttention) the dense mask is used."""
        if self.block is not None and dropout == 0.0:
            from torch.nn.attention.flex_attention import flex_attention

            fn = _flex_attention() if self.compiled else flex_attention
            return fn(q, k, v, block_mask=self.block)
        mask = self.dense if self.dense is not None else dense_document_mask(self.segment)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


def cross_memory_mask(segment: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Mask [R, 1, L, N*M] over the memories of all N persons laid end to end ([N, M] `visible`):
    a query sees only its own person's visible memory tokens; padding queries see person 0's
    memory (its null token is always visible), so they are never fully masked."""
    persons, slots = visible.shape
    owner = torch.arange(persons, device=segment.device).repeat_interleave(slots)  # [N*M]
    seg = segment.clamp(min=0)
    return ((seg[:, :, None] == owner) & visible.reshape(-1))[:, None]
