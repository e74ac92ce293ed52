"""PRS as a modality: soft tokens from K scores, a learned stand-in for people without genotypes,
and gated cross-attention from the event stream to those tokens.

Each parameter is used only inside the forward of the module that owns it, so ZeRO-3 (which
gathers a module's parameters around its own forward) can partition these modules too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ehrfm.model.config import ModelConfig


class PRSEncoder(nn.Module):
    """K z-scores -> `prs_tokens` soft tokens of width `hidden` (MLP K -> prs_hidden -> T x hidden).

    People without a PRS get the learned `missing` tokens instead, so the model always sees the
    same shape and can tell "no genotype" from "average genotype". In training, modality dropout
    shows a random share of genotyped people as missing, so one model serves both groups.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tokens, self.hidden = cfg.prs_tokens, cfg.hidden
        self.modality_dropout = cfg.modality_dropout
        self.fc_in = nn.Linear(cfg.num_pgs, cfg.prs_hidden)
        self.fc_out = nn.Linear(cfg.prs_hidden, cfg.prs_tokens * cfg.hidden)
        self.norm = nn.RMSNorm(cfg.hidden)
        self.missing = nn.Parameter(torch.zeros(cfg.prs_tokens, cfg.hidden))

    def forward(self, prs: torch.Tensor, has_prs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(soft tokens [B, T, H], has_prs after modality dropout [B] bool)."""
        has_prs = has_prs.bool()
        if self.training and self.modality_dropout > 0:
            keep = torch.rand(has_prs.shape, device=has_prs.device) >= self.modality_dropout
            has_prs = has_prs & keep
        scores = torch.nan_to_num(prs.to(self.fc_in.weight.dtype))
        soft = self.fc_out(F.gelu(self.fc_in(scores), approximate="tanh"))
        soft = self.norm(soft.view(prs.shape[0], self.tokens, self.hidden))
        missing = self.missing.unsqueeze(0).expand_as(soft)
        return torch.where(has_prs[:, None, None], soft, missing), has_prs


class CrossMemory(nn.Module):
    """Keys/values for cross-attention: one always-visible null token, then the PRS soft tokens.

    The soft tokens are masked out for people without a PRS (the attention mask), so they attend
    only to the null token; genotyped people can also fall back on it when the PRS is uninformative.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.null = nn.Parameter(torch.zeros(1, 1, cfg.hidden))

    def forward(self, soft: torch.Tensor, has_prs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = soft.shape[0]
        memory = torch.cat([self.null.to(soft.dtype).expand(batch, 1, -1), soft], dim=1)
        visible = torch.cat(
            [torch.ones(batch, 1, dtype=torch.bool, device=soft.device), has_prs[:, None].expand(batch, soft.shape[1])],
            dim=1,
        )
        return memory, visible


class GatedCrossAttention(nn.Module):
    """x + tanh(gate) * CrossAttn(norm(x), memory); gate starts at 0, so a new block changes nothing
    until training opens it (pretrained EHR behaviour is kept, as in Flamingo-style adapters)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.norm = nn.RMSNorm(cfg.hidden)
        self.q = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.kv = nn.Linear(cfg.hidden, 2 * cfg.hidden, bias=False)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.gate = nn.Parameter(torch.zeros(1))
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, memory: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """memory [B, M, H] with visible [B, M]; or, for packed rows, the memories of all N persons
        [N, M, H] with a mask [R, 1, L, N*M] that lets each position see its own person's only."""
        batch, length, hidden = x.shape
        q = self.q(self.norm(x)).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(memory.to(x.dtype)).split(hidden, dim=2)
        if visible.dim() == 4:  # packed: every person's memory end to end, shared by all rows
            k, v, mask = k.reshape(1, -1, hidden), v.reshape(1, -1, hidden), visible
        else:
            mask = visible[:, None, None, :]
        k = k.view(k.shape[0], -1, self.heads, self.head_dim).transpose(1, 2).expand(batch, -1, -1, -1)
        v = v.view(v.shape[0], -1, self.heads, self.head_dim).transpose(1, 2).expand(batch, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        out = self.proj(out.transpose(1, 2).reshape(batch, length, hidden))
        return x + torch.tanh(self.gate).to(x.dtype) * out
