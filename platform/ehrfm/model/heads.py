"""Heads on top of the decoder: a classifier on the representation at a prediction time, and
sampling of future event tokens with the KV cache (the language-model head itself is tied to the
input embedding inside `EHRDecoder`)."""

from __future__ import annotations

import torch
from torch import nn

from ehrfm.constants import EOS_ID, PAD_ID
from ehrfm.model.transformer import EHRDecoder


class ClassificationHead(nn.Module):
    """Linear probe / fine-tuning head: hidden state at the prediction position -> `outputs` logits."""

    def __init__(self, hidden: int, outputs: int = 1, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden, outputs)
        nn.init.zeros_(self.linear.bias)
        nn.init.normal_(self.linear.weight, std=0.02)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(hidden))


@torch.no_grad()
def generate(
    model: EHRDecoder,
    tokens: torch.Tensor,
    ages: torch.Tensor,
    prs: torch.Tensor | None = None,
    has_prs: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample continuations [B, max_new_tokens] of non-padded prompts; PAD after a sequence's EOS.

    Generated tokens carry the prompt's last age (the time tokens, not the age input, tell the
    model how far it has moved); temperature 0 means greedy decoding.
    """
    was_training = model.training
    model.eval()
    logits, cache = model.prefill(tokens, ages, prs, has_prs)
    age = ages[:, -1]
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    out = []
    for _ in range(max_new_tokens):
        if temperature == 0:
            nxt = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        nxt = torch.where(finished, torch.full_like(nxt, PAD_ID), nxt)
        out.append(nxt)
        finished |= nxt == EOS_ID
        logits = model.decode_step(nxt, age, cache)
    model.train(was_training)
    return torch.stack(out, dim=1)
