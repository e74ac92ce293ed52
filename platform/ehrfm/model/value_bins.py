"""Recent lab-value bins read straight from a prediction window's tokens, for a linear head.

Why: on the default cohort the frozen decoder's pooled states lose to counts+PRS boosting, and the
gap is a few recent lab values (glucose, HbA1c, BMI, blood pressure) that boosting thresholds.
The states do hold each value's bin (a linear probe at the value token recovers it for 93-98% of
measurements), but entangled with the rest of the context: a head fit on a few hundred events
cannot learn that map, while a one-hot of the bins hands it a ready-made basis (README, #21,
"Where the values are lost").

The readout: for each of the `n_codes` most frequent codes with value bins (the tokenizer's train
counts), the quantile-bin token of its last measurement inside the window, once per recency
bucket (within 30 days of the window's last token, within 365 days, anywhere in the window), as
either a one-hot of the bin or cumulative columns (measured, bin >= 1, ..., bin >= n-1). The
cumulative form spans the same functions for a linear head, but its L2 penalty then falls on the
steps between neighbouring bins, so adjacent deciles share evidence instead of each being learned
from its own few events (README, "The value-bin readout"). A measurement is a code token
immediately followed by a value token, as the tokenizer writes them (`[gap] code [Q]`). Only
tokens the decoder reads are used: nothing from outside the window, and for whole-history inputs
only the newest window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import nn

DEFAULT_RECENCY_DAYS = (30, 365)  # and a last bucket with no bound: anywhere in the window
ValueEncoding = Literal["one_hot", "cumulative"]  # the configs' and head.json's one list
ENCODINGS = get_args(ValueEncoding)


@dataclass(frozen=True)
class ValueBinReadout:
    """Which codes and bins the readout one-hots (token ids, so the model needs no tokenizer; the
    code names travel beside them for people), and the recency bounds in days: one bucket per
    bound, then one with no bound (anywhere in the window). transfer/value_bins.py builds one
    from a tokenizer."""

    codes: tuple[str, ...]
    code_ids: tuple[int, ...]
    value_ids: tuple[int, ...]  # the value tokens, lowest bin first
    recency_days: tuple[int, ...] = DEFAULT_RECENCY_DAYS
    encoding: ValueEncoding = "one_hot"  # or "cumulative": column j is "measured and bin >= j" (j = 0: measured)

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {list(ENCODINGS)}, got {self.encoding!r}")
        if not self.code_ids or len(self.codes) != len(self.code_ids) or not self.value_ids:
            raise ValueError("a value readout needs codes, their token ids (as many) and the value token ids")
        if any(d < 0 for d in self.recency_days):
            raise ValueError(f"recency_days must be >= 0, got {list(self.recency_days)}")

    @property
    def buckets(self) -> tuple[int | None, ...]:
        return (*sorted(set(self.recency_days)), None)

    @property
    def width(self) -> int:
        return len(self.buckets) * len(self.code_ids) * len(self.value_ids)

    def bin_numbers(self, columns: np.ndarray) -> np.ndarray:
        """The readout's columns as one number per (recency bucket, code) slot: the bin (0 = lowest),
        NaN where the code was not measured. A boosted head's form: it splits one ordered column
        (and learns "unmeasured" as its own branch), where ten 0/1 columns would each need a split."""
        columns = np.asarray(columns)
        n_bins = len(self.value_ids)
        if columns.ndim != 2 or columns.shape[1] != self.width:
            raise ValueError(f"expected [rows, {self.width}] readout columns, got {list(columns.shape)}")
        slots = columns.reshape(len(columns), -1, n_bins) > 0
        if self.encoding == "cumulative":  # "measured, bin >= 1, ...": the count of ones is bin + 1
            number = slots.sum(-1) - 1.0
        else:
            number = np.where(slots.any(-1), slots.argmax(-1), -1).astype(np.float64)
        return np.where(number < 0, np.nan, number)

    def features(self, tokens: np.ndarray, ages: np.ndarray, length: np.ndarray) -> np.ndarray:
        """numpy in and out: `ValueBinFeatures` on CPU (one implementation for every caller)."""
        with torch.no_grad():
            out = ValueBinFeatures(self)(
                torch.as_tensor(np.asarray(tokens), dtype=torch.long),
                torch.as_tensor(np.asarray(ages), dtype=torch.long),
                torch.as_tensor(np.asarray(length), dtype=torch.long),
            )
        return out.numpy()


class ValueBinFeatures(nn.Module):
    """The readout as a module (its lookups move with the model, no host sync in a step).

    forward -> [n, width] float 0/1, laid out (recency bucket, code, bin column). tokens/ages [n, T] with
    `length` [n] real tokens, or [n, W, T] with length [n, W] (oldest window first: the newest is
    read)."""

    def __init__(self, readout: ValueBinReadout):
        super().__init__()
        self.readout = readout
        self.cumulative = readout.encoding == "cumulative"
        top = max(*readout.code_ids, *readout.value_ids) + 1
        code_of = torch.full((top,), -1, dtype=torch.long)
        code_of[torch.tensor(readout.code_ids)] = torch.arange(len(readout.code_ids))
        bin_of = torch.full((top,), -1, dtype=torch.long)
        bin_of[torch.tensor(readout.value_ids)] = torch.arange(len(readout.value_ids))
        self.register_buffer("code_of", code_of, persistent=False)  # from head.json, not weights
        self.register_buffer("bin_of", bin_of, persistent=False)

    def _lookup(self, table: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        inside = tokens < len(table)
        return torch.where(inside, table[tokens.clamp(0, len(table) - 1)], torch.full_like(tokens, -1))

    def forward(self, tokens: torch.Tensor, ages: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        if tokens.dim() == 3:
            tokens, ages, length = tokens[:, -1], ages[:, -1], length[:, -1]
        n, width = tokens.shape
        n_codes, n_bins = len(self.readout.code_ids), len(self.readout.value_ids)
        buckets = len(self.readout.buckets)
        if width < 2:
            return torch.zeros(n, buckets * n_codes * n_bins, device=tokens.device)
        tokens, ages, length = tokens.long(), ages.long(), length.long()
        code = self._lookup(self.code_of, tokens[:, :-1])  # a code token ...
        value_bin = self._lookup(self.bin_of, tokens[:, 1:])  # ... followed by its value token
        position = torch.arange(1, width, device=tokens.device).expand(n, -1)  # the value token's
        measured = (code >= 0) & (value_bin >= 0) & (position < length[:, None])  # padding never counts
        end_age = ages.gather(1, (length - 1).clamp(min=0)[:, None])
        days_before_end = end_age - ages[:, 1:]
        key = torch.arange(n, device=tokens.device)[:, None] * n_codes + code.clamp(min=0)
        flat_rows = torch.arange(n * n_codes, device=tokens.device) // n_codes
        parts = []
        for bound in self.readout.buckets:
            keep = measured if bound is None else measured & (days_before_end <= bound)
            # the latest measurement of each (row, code): the largest position kept (0: none)
            latest = torch.zeros(n * n_codes, dtype=torch.long, device=tokens.device).scatter_reduce(
                0, key.reshape(-1), torch.where(keep, position, 0).reshape(-1), "amax"
            )
            bins = value_bin[flat_rows, (latest - 1).clamp(min=0)].clamp(min=0)
            # comparisons, not F.one_hot, which checks its indices with a host sync on CUDA
            columns = torch.arange(n_bins, device=tokens.device)
            hit = bins[:, None] >= columns if self.cumulative else bins[:, None] == columns
            parts.append((hit & (latest > 0)[:, None]).reshape(n, n_codes * n_bins))
        return torch.cat(parts, dim=1).float()
