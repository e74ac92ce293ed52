"""The decoder's configuration: one dataclass that fully determines the architecture.

It is a plain dataclass so model code needs nothing beyond torch; training configs embed it and
pydantic validates it there (`__pydantic_config__` makes unknown keys an error, as in every config).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

Fusion = Literal["none", "prefix", "cross"]


@dataclass
class ModelConfig:
    """Architecture of `EHRDecoder`. Defaults are the reference ~300M design (vocabulary-dependent)."""

    __pydantic_config__ = {"extra": "forbid"}

    vocab_size: int = 0  # 0: filled from timelines/manifest.json at training time
    num_pgs: int = 0  # K, number of PRS columns; 0: filled from the manifest
    hidden: int = 960
    layers: int = 12
    heads: int = 8
    context: int = 2048  # event tokens per window (PRS prefix tokens come on top)
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    rope_base: float = 10_000.0
    age_frequencies: int = 16  # sinusoidal age features, periods from a week to two centuries
    init_std: float = 0.02
    # PRS as a modality
    fusion: Fusion = "none"  # none: EHR only; prefix: soft tokens before the events; cross: gated cross-attention
    prs_tokens: int = 10  # soft tokens the PRS MLP produces
    prs_hidden: int = 4096  # width of the PRS MLP (K -> prs_hidden -> prs_tokens x hidden)
    cross_every: int = 3  # cross fusion: a gated cross-attention block in every k-th layer
    modality_dropout: float = 0.0  # training only: chance a genotyped person is shown as non-genotyped
    adapter: bool = False  # train only the PRS parts; the EHR decoder's weights stay frozen

    def __post_init__(self) -> None:
        problems = []
        if self.hidden % self.heads:
            problems.append(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        elif (self.hidden // self.heads) % 2:
            problems.append(f"head size {self.hidden // self.heads} must be even for rotary embeddings")
        for name in ("hidden", "layers", "heads", "context", "prs_tokens", "prs_hidden", "cross_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.vocab_size < 0 or self.num_pgs < 0:
            problems.append("vocab_size and num_pgs must be >= 0 (0 = read from the data manifest)")
        if not 0.0 <= self.modality_dropout < 1.0:
            problems.append("modality_dropout must be in [0, 1)")
        if not 0.0 <= self.dropout < 1.0:
            problems.append("dropout must be in [0, 1)")
        if self.fusion == "cross" and self.cross_every > self.layers:
            problems.append(
                f"cross_every ({self.cross_every}) exceeds layers ({self.layers}): no cross-attention block"
            )
        if self.adapter and self.fusion == "none":
            problems.append("adapter mode adds PRS to a pretrained model: set fusion to prefix or cross")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def prefix_length(self) -> int:
        """Positions in front of the events: the soft PRS tokens in prefix fusion, else none."""
        return self.prs_tokens if self.fusion == "prefix" else 0

    def cross_layers(self) -> list[int]:
        """Indices of the layers that carry a gated cross-attention block."""
        if self.fusion != "cross":
            return []
        return [i for i in range(self.layers) if (i + 1) % self.cross_every == 0]

    def with_data(self, vocab_size: int, num_pgs: int) -> ModelConfig:
        """This config with the data's vocabulary and PRS width; a mismatch with set values is an error."""
        for name, value in (("vocab_size", vocab_size), ("num_pgs", num_pgs)):
            current = getattr(self, name)
            if current and current != value:
                raise ValueError(f"model.{name} is {current} but the data manifest says {value}")
        return dataclasses.replace(self, vocab_size=vocab_size, num_pgs=num_pgs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        return cls(**data)
