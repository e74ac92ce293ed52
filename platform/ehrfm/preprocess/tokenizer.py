"""The event tokenizer: vocabulary, value bins and time-gap tokens, fit on the train split only.

A timeline is `[BOS] events... [EOS]`, where each event becomes
  [GAP/...]  when it falls on a later day than the event before it (day/week/month/year buckets;
             carries the age of the event it precedes, so cutting a timeline at a time never
             reveals how long it was until the next event),
  CODE       its code's id (UNK when the code is not in the vocabulary),
  [Qk]       when the code has value bins and the event a numeric value: its decile bin.
The demographic codes sit at the birth time, so they form the prefix right after BOS; the
MEDS_BIRTH event itself is not a token (BOS stands for birth, age 0). EOS carries the age of the
last event. Ids: the reserved ones from schemas.py, then Q0..Q9, the gap tokens, and the codes by
descending train count (ties by code), so the same train data always gives the same ids.

Bin edges are order statistics of the train values (the value at rank ceil(j*n/B)), never
interpolated, so any engine computing them from the same values gets the same float32 numbers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ehrfm.constants import BOS_ID, EOS_ID, FIRST_CODE_ID, SPECIAL_TOKENS, UNK_ID
from ehrfm.omop.events import BIRTH_CODE, DAY_US, code_priority

TOKENIZER_FORMAT = "ehrfm-tokenizer/1"


def value_token_names(n_bins: int) -> list[str]:
    return [f"Q{k}" for k in range(n_bins)]


def gap_token_names(edges_days: list[int]) -> list[str]:
    """`GAP/1-6D`, `GAP/7-29D`, ..., `GAP/1825D+` for edges [1, 7, 30, ..., 1825]."""
    names = [f"GAP/{lo}-{hi - 1}D" for lo, hi in zip(edges_days[:-1], edges_days[1:])]
    return names + [f"GAP/{edges_days[-1]}D+"]


def check_gap_edges(edges_days: list[int]) -> None:
    if not edges_days or edges_days[0] < 1 or any(b <= a for a, b in zip(edges_days, edges_days[1:])):
        raise ValueError(f"gap edges must be strictly increasing whole days starting at >= 1, got {edges_days}")


def quantile_edges(values: np.ndarray, n_bins: int) -> np.ndarray:
    """The n_bins-1 inner edges: the sorted value at rank ceil(j*n/n_bins), j = 1..n_bins-1."""
    ordered = np.sort(np.asarray(values, dtype=np.float32), kind="stable")
    n = len(ordered)
    ranks = (np.arange(1, n_bins, dtype=np.int64) * n + n_bins - 1) // n_bins - 1
    return ordered[ranks]


@dataclass
class Tokenizer:
    """A fitted tokenizer; `tokens[i]` is the token with id i. Saved as a versioned JSON artifact."""

    tokens: list[str]
    code_counts: dict[str, int]
    value_edges: dict[str, list[float]]
    gap_edges_days: list[int]
    n_bins: int
    min_count: int
    min_values_for_bins: int
    fit_summary: dict = field(default_factory=dict)

    # ---- identity ---------------------------------------------------------------------------------
    def content(self) -> dict:
        return {
            "format": TOKENIZER_FORMAT,
            "tokens": self.tokens,
            "code_counts": self.code_counts,
            "value_edges": self.value_edges,
            "gap_edges_days": self.gap_edges_days,
            "n_bins": self.n_bins,
            "min_count": self.min_count,
            "min_values_for_bins": self.min_values_for_bins,
            "fit_summary": self.fit_summary,
        }

    @property
    def version(self) -> str:
        """`1-<hash>`: the format generation plus a hash of everything fitted (same fit, same version)."""
        digest = hashlib.sha256(json.dumps(self.content(), sort_keys=True).encode()).hexdigest()[:16]
        return f"1-{digest}"

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def to_json(self) -> str:
        return json.dumps({"version": self.version, **self.content()}, indent=1, sort_keys=True) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("format") != TOKENIZER_FORMAT:
            raise ValueError(f"{path}: not an {TOKENIZER_FORMAT} artifact (format {data.get('format')!r})")
        stored = data.pop("version")
        data.pop("format")
        tok = cls(**data)
        if tok.version != stored:
            raise ValueError(f"{path}: content does not match its version {stored} (edited by hand?)")
        return tok

    # ---- lookup tables ----------------------------------------------------------------------------
    @cached_property
    def token_id(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.tokens)}

    @cached_property
    def _code_lookup(self) -> tuple[pa.Array, np.ndarray]:
        codes = sorted(self.code_counts)
        return pa.array(codes, pa.string()), np.array([self.token_id[c] for c in codes], dtype=np.int32)

    @cached_property
    def _bin_lookup(self) -> tuple[pa.Array, np.ndarray]:
        codes = sorted(self.value_edges)
        edges = np.array([self.value_edges[c] for c in codes], dtype=np.float32).reshape(len(codes), self.n_bins - 1)
        return pa.array(codes, pa.string()), edges

    @cached_property
    def _gap_ids(self) -> np.ndarray:
        return np.array([self.token_id[name] for name in gap_token_names(self.gap_edges_days)], dtype=np.int32)

    @cached_property
    def _value_ids(self) -> np.ndarray:
        return np.array([self.token_id[name] for name in value_token_names(self.n_bins)], dtype=np.int32)

    # ---- apply --------------------------------------------------------------------------------------
    def tokenize(self, events: pa.Table) -> ShardTimelines:
        """Timelines of every subject in `events` (whole subjects, in events/ sort order)."""
        return tokenize_events(events, self)


def fit_value_edges(values: np.ndarray, n_bins: int, min_values: int) -> np.ndarray | None:
    """Edges for one code's train values, or None when it has fewer than `min_values` of them."""
    return quantile_edges(values, n_bins) if len(values) >= min_values else None


def build_tokenizer(
    code_counts: dict[str, int],
    value_edges: dict[str, np.ndarray],
    *,
    min_count: int,
    n_bins: int,
    min_values_for_bins: int,
    gap_edges_days: list[int],
    fit_summary: dict | None = None,
) -> Tokenizer:
    """Assemble a tokenizer from train-split statistics: event counts per code, and the value-bin
    edges of the codes that had enough numeric values (`fit_value_edges`). Codes below `min_count`
    are left out, and so are their bins."""
    check_gap_edges(gap_edges_days)
    if n_bins < 2:
        raise ValueError("n_bins must be at least 2")
    kept = {code: int(n) for code, n in code_counts.items() if n >= min_count and code != BIRTH_CODE}
    ordered = sorted(kept, key=lambda c: (-kept[c], c))
    structural = value_token_names(n_bins) + gap_token_names(gap_edges_days)
    tokens = sorted(SPECIAL_TOKENS, key=SPECIAL_TOKENS.get) + structural + ordered
    if len(tokens) != len(set(tokens)):
        raise ValueError("a code collides with a structural token name")
    assert tokens.index(structural[0]) == FIRST_CODE_ID
    edges = {
        code: [float(x) for x in np.asarray(e, dtype=np.float32)]
        for code, e in sorted(value_edges.items())
        if code in kept and e is not None
    }
    if any(len(e) != n_bins - 1 for e in edges.values()):
        raise ValueError(f"value edges must have n_bins - 1 = {n_bins - 1} entries")
    summary = dict(fit_summary or {})
    summary.update(
        {"codes_seen": len(code_counts), "codes_in_vocabulary": len(kept), "codes_with_value_bins": len(edges)}
    )
    return Tokenizer(
        tokens,
        {c: kept[c] for c in ordered},
        edges,
        list(gap_edges_days),
        n_bins,
        min_count,
        min_values_for_bins,
        summary,
    )


# ---- apply, vectorised over a whole shard ------------------------------------------------------------
@dataclass
class ShardTimelines:
    """Token and age lists per subject (subjects ascending), plus counts for the report."""

    subject_id: np.ndarray  # int64 [n]
    birth_day: np.ndarray  # int64 days since epoch [n]
    tokens: pa.ListArray  # list<int32>
    ages: pa.ListArray  # list<int32>
    stats: dict


def _dictionary_ids(codes: pa.Array, value_set: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(per-row index into value_set or -1, per-dictionary-entry found mask) for a string column."""
    encoded = codes.dictionary_encode()
    found = pc.index_in(encoded.dictionary, value_set=value_set)
    entry = pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    return entry[indices], entry >= 0


def _subject_runs(subject: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique subjects in order, run index per row) for rows grouped by subject."""
    starts = np.r_[True, subject[1:] != subject[:-1]] if len(subject) else np.zeros(0, dtype=bool)
    return subject[starts], np.cumsum(starts) - 1


@dataclass
class _CodeTable:
    """Per distinct code of a shard (the dictionary): everything the tokenizer decides about it."""

    is_birth: np.ndarray
    priority: np.ndarray
    token_id: np.ndarray  # vocabulary id or UNK
    known: np.ndarray
    bin_row: np.ndarray  # row of the code's value edges, -1 without bins

    @classmethod
    def build(cls, dictionary: pa.Array, tok: Tokenizer) -> _CodeTable:
        vocab_codes, vocab_ids = tok._code_lookup
        row = pc.fill_null(pc.index_in(dictionary, value_set=vocab_codes), -1).to_numpy(zero_copy_only=False)
        bin_codes, _ = tok._bin_lookup
        bins = (
            pc.fill_null(pc.index_in(dictionary, value_set=bin_codes), -1).to_numpy(zero_copy_only=False)
            if len(bin_codes)
            else np.full(len(dictionary), -1)
        )
        return cls(
            is_birth=pc.fill_null(pc.equal(dictionary, BIRTH_CODE), False).to_numpy(zero_copy_only=False),
            priority=code_priority(dictionary),
            token_id=np.where(row >= 0, vocab_ids[np.maximum(row, 0)], UNK_ID).astype(np.int32),
            known=row >= 0,
            bin_row=np.asarray(bins, dtype=np.int64),
        )


def _check_sorted(subject: np.ndarray, time_us: np.ndarray) -> None:
    if len(subject) and (
        np.any(subject[1:] < subject[:-1]) or np.any((subject[1:] == subject[:-1]) & (time_us[1:] < time_us[:-1]))
    ):
        raise ValueError("tokenize: events must be sorted by subject_id and time (a shard read by ehrfm.meds.writer)")


def _birth_days(run: np.ndarray, time_us: np.ndarray, is_birth: np.ndarray, n_subjects: int) -> np.ndarray:
    """Day number (since 1970) of each subject's earliest MEDS_BIRTH event."""
    birth_us = np.full(n_subjects, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(birth_us, run[is_birth], time_us[is_birth])
    missing = int((birth_us == np.iinfo(np.int64).max).sum())
    if missing:
        raise ValueError(f"tokenize: {missing} subjects have no {BIRTH_CODE} event")
    return np.floor_divide(birth_us, DAY_US)


def _timeline_order(run: np.ndarray, day: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Row order of the timeline: by subject, day, then priority, keeping the shard's order within.

    A shard is sorted by (subject, time, ...), so (subject, day) groups are already contiguous and
    in order; a stable sort on (group, priority) is all that is left to do.
    """
    new_group = np.r_[True, (run[1:] != run[:-1]) | (day[1:] != day[:-1])] if len(run) else np.zeros(0, bool)
    return np.argsort((np.cumsum(new_group) << 4) | priority.astype(np.int64), kind="stable")


def _assemble(
    run: np.ndarray,
    day: np.ndarray,
    code_ids: np.ndarray,
    q_rows: np.ndarray,
    q_ids: np.ndarray,
    gap_ids: np.ndarray,
    n_subjects: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, tokens, ages): BOS, per event [gap] code [Q], EOS, for events in timeline order.

    `gap_ids` holds each event's gap token id or -1 (no gap); a gap token carries the age of the
    event it precedes.
    """
    has_gap = gap_ids >= 0
    has_q = np.zeros(len(run), dtype=bool)
    has_q[q_rows] = True
    per_event = has_gap.astype(np.int64) + 1 + has_q
    per_subject = np.bincount(run, weights=per_event, minlength=n_subjects).astype(np.int64) + 2
    offsets = np.r_[0, np.cumsum(per_subject)]
    if offsets[-1] >= 2**31:
        raise ValueError("tokenize: a shard holds 2^31 tokens or more; use more shards (subjects_per_shard)")
    earlier_events = np.cumsum(per_event) - per_event  # tokens of all earlier events in the shard
    before_subject = np.r_[0, np.cumsum(per_subject - 2)[:-1]]  # tokens of earlier subjects' events
    code_pos = offsets[run] + 1 + earlier_events - before_subject[run] + has_gap
    tokens = np.empty(offsets[-1], dtype=np.int32)
    ages = np.empty(offsets[-1], dtype=np.int32)
    tokens[offsets[:-1]], ages[offsets[:-1]] = BOS_ID, 0
    tokens[code_pos[has_gap] - 1], ages[code_pos[has_gap] - 1] = gap_ids[has_gap], day[has_gap]
    tokens[code_pos], ages[code_pos] = code_ids, day
    tokens[code_pos[q_rows] + 1], ages[code_pos[q_rows] + 1] = q_ids, day[q_rows]
    last_day = np.zeros(n_subjects, dtype=np.int64)
    last_of_subject = np.r_[run[1:] != run[:-1], True] if len(run) else np.zeros(0, dtype=bool)
    last_day[run[last_of_subject]] = day[last_of_subject]  # rows are in (subject, day) order
    tokens[offsets[1:] - 1], ages[offsets[1:] - 1] = EOS_ID, last_day
    return offsets, tokens, ages


def tokenize_events(events: pa.Table, tok: Tokenizer) -> ShardTimelines:
    subject = events["subject_id"].combine_chunks().to_numpy(zero_copy_only=False).astype(np.int64)
    time_us = events["time"].combine_chunks().cast(pa.int64()).to_numpy(zero_copy_only=False)
    value = pc.fill_null(events["numeric_value"].combine_chunks(), np.nan).to_numpy(zero_copy_only=False)
    _check_sorted(subject, time_us)
    encoded = events["code"].combine_chunks().dictionary_encode()  # decide per distinct code, index per row
    codes = _CodeTable.build(encoded.dictionary, tok)
    entry = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)

    subjects, run = _subject_runs(subject)
    is_birth = codes.is_birth[entry]
    birth_day = _birth_days(run, time_us, is_birth, len(subjects))
    rows = np.flatnonzero(~is_birth)
    run, entry, value = run[rows], entry[rows], value[rows]
    day = np.floor_divide(time_us[rows], DAY_US) - birth_day[run]
    if np.any(day < 0):
        raise ValueError(f"tokenize: {int((day < 0).sum())} events before their subject's birth")
    order = _timeline_order(run, day, codes.priority[entry])
    run, day, value, entry = run[order], day[order], value[order], entry[order]

    code_ids = codes.token_id[entry]
    bin_row = codes.bin_row[entry]
    q_rows = np.flatnonzero((bin_row >= 0) & ~np.isnan(value))
    _, edges = tok._bin_lookup
    q_ids = tok._value_ids[(edges[bin_row[q_rows]] < value[q_rows, None]).sum(axis=1)]
    first_of_subject = np.r_[True, run[1:] != run[:-1]] if len(run) else np.zeros(0, dtype=bool)
    gap = day - np.where(first_of_subject, 0, np.r_[0, day[:-1]])  # the first event's gap is from birth
    bucket = np.searchsorted(np.asarray(tok.gap_edges_days), gap, side="right") - 1
    gap_ids = np.where(bucket >= 0, tok._gap_ids[np.maximum(bucket, 0)], -1)
    offsets, tokens, ages = _assemble(run, day, code_ids, q_rows, q_ids, gap_ids, len(subjects))

    pa_offsets = pa.array(offsets.astype(np.int32))
    stats = {
        "subjects": len(subjects),
        "events": int(len(rows)),
        "tokens": int(offsets[-1]),
        "unk_tokens": int((code_ids == UNK_ID).sum()),
        "unseen_codes": int((~codes.known & ~codes.is_birth).sum()),
        "value_tokens": int(len(q_rows)),
        "gap_tokens": int((gap_ids >= 0).sum()),
    }
    return ShardTimelines(
        subjects,
        birth_day,
        pa.ListArray.from_arrays(pa_offsets, pa.array(tokens)),
        pa.ListArray.from_arrays(pa_offsets, pa.array(ages)),
        stats,
    )


# ---- fit: per-batch partial statistics (train split only) ---------------------------------------
def train_rows(events: pa.Table, train_mask: np.ndarray) -> pa.Table:
    """The train-split, non-birth events of a batch (what the vocabulary and bins may see)."""
    keep = train_mask & ~pc.fill_null(pc.equal(events["code"], BIRTH_CODE), False).to_numpy(zero_copy_only=False)
    return events.filter(pa.array(keep))


def code_counts_table(train: pa.Table) -> pa.Table:
    """(code, n) per code of a batch of train events."""
    if train.num_rows == 0:
        return pa.table({"code": pa.array([], pa.string()), "n": pa.array([], pa.int64())})
    counted = train.select(["code"]).group_by("code").aggregate([("code", "count")])
    return pa.table({"code": counted["code"], "n": pc.cast(counted["code_count"], pa.int64())})


def code_values_table(train: pa.Table, bin_codes: pa.Array) -> pa.Table:
    """(code_index, value) for train events with a numeric value whose code may get bins."""
    value = train["numeric_value"].combine_chunks()
    index, _ = (
        _dictionary_ids(train["code"].combine_chunks(), bin_codes) if train.num_rows else (np.zeros(0, np.int64), None)
    )
    keep = (index >= 0) & value.is_valid().to_numpy(zero_copy_only=False)
    keep &= ~np.isnan(pc.fill_null(value, 0.0).to_numpy(zero_copy_only=False))
    return pa.table(
        {"code_index": pa.array(index[keep].astype(np.int32)), "value": value.filter(pa.array(keep)).cast(pa.float32())}
    )
