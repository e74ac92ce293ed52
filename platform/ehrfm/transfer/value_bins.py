"""The value-bin readout (model/value_bins.py) of a tokenizer's most measured lab codes."""

from __future__ import annotations

from pathlib import Path

from ehrfm.model.value_bins import DEFAULT_RECENCY_DAYS, ValueBinReadout, ValueEncoding
from ehrfm.preprocess.tokenizer import Tokenizer, value_token_names


def binned_codes(tokenizer: Tokenizer) -> list[str]:
    """The vocabulary's codes whose values the tokenizer writes as bin tokens."""
    return [code for code in tokenizer.value_edges if code in tokenizer.token_id]


def readout_from_tokenizer(
    tokenizer: Tokenizer,
    n_codes: int,
    recency_days: tuple[int, ...] = DEFAULT_RECENCY_DAYS,
    encoding: ValueEncoding = "one_hot",
) -> ValueBinReadout:
    """The `n_codes` codes with value bins that the train split measured most (ties by code name)."""
    if n_codes < 1:
        raise ValueError(f"n_codes must be >= 1, got {n_codes}")
    ids = tokenizer.token_id
    binned = binned_codes(tokenizer)
    if not binned:
        raise ValueError("the tokenizer has no code with value bins: nothing for a value readout to read")
    ranked = sorted(binned, key=lambda c: (-tokenizer.code_counts.get(c, 0), c))[:n_codes]
    return ValueBinReadout(
        codes=tuple(ranked),
        code_ids=tuple(int(ids[c]) for c in ranked),
        value_ids=tuple(int(ids[name]) for name in value_token_names(tokenizer.n_bins)),
        recency_days=tuple(int(d) for d in recency_days),
        encoding=encoding,
    )


def readout_if_binned(
    tokenizer_path: str | Path,
    n_codes: int,
    recency_days: tuple[int, ...] = DEFAULT_RECENCY_DAYS,
    encoding: ValueEncoding = "one_hot",
) -> ValueBinReadout | None:
    """The readout a config asks for (`n_codes` > 0) over the dataset's tokenizer; None when it asks
    for none, or, said on stdout, when the tokenizer binned no values (a dataset without numeric
    measurements), so that a default that asks for one still runs there."""
    if not n_codes:
        return None
    tokenizer = Tokenizer.load(tokenizer_path)
    if not binned_codes(tokenizer):
        print(f"{tokenizer_path}: no code has value bins, so the head reads the states alone (value codes unused)")
        return None
    return readout_from_tokenizer(tokenizer, n_codes, recency_days, encoding)
