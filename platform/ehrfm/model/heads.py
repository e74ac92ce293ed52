"""The classification head on the decoder's representation at a prediction time (the language-model
head is tied to the input embedding inside `EHRDecoder`; sampling lives in `model.sampling`)."""

from __future__ import annotations

import torch
from torch import nn


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
