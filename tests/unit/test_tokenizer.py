"""The tokenizer on hand-made events: exact tokens and ages, ids, bins, gaps, UNK; the artifact;
and the person-level split/shard hash it relies on."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pytest

from ehrfm.constants import BOS_ID, EOS_ID, FIRST_CODE_ID, PAD_ID, UNK_ID
from ehrfm.preprocess.tokenizer import (
    Tokenizer,
    build_tokenizer,
    code_counts_table,
    fit_value_edges,
    gap_token_names,
    quantile_edges,
    train_rows,
)  # fmt: skip
from ehrfm.splits import num_shards_for, shard_of, split_codes, subject_uniform

T = dt.datetime
GAPS = [1, 7, 30, 365]


def events(rows: list[tuple]) -> pa.Table:
    """(subject, time, code, value) rows, already in events/ order (subject, time)."""
    return pa.table(
        {
            "subject_id": pa.array([r[0] for r in rows], pa.int64()),
            "time": pa.array([r[1] for r in rows], pa.timestamp("us")),
            "code": pa.array([r[2] for r in rows], pa.string()),
            "numeric_value": pa.array([r[3] for r in rows], pa.float32()),
        }
    )


def tokenizer(
    counts: dict[str, int], values: dict[str, list[float]], min_count: int = 1, min_values: int = 4
) -> Tokenizer:
    edges = {c: fit_value_edges(np.asarray(v, np.float32), 10, min_values) for c, v in values.items()}
    return build_tokenizer(
        counts,
        {c: e for c, e in edges.items() if e is not None},
        min_count=min_count,
        n_bins=10,
        min_values_for_bins=min_values,
        gap_edges_days=GAPS,
    )


def test_quantile_edges_are_order_statistics() -> None:
    values = np.arange(1, 101, dtype=np.float32)[::-1]  # 100..1, unsorted on purpose
    assert quantile_edges(values, 10).tolist() == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert quantile_edges(np.array([3, 1, 2], np.float32), 4).tolist() == [1, 2, 3]  # ranks ceil(j*3/4): 1, 2, 3
    assert fit_value_edges(np.ones(3, np.float32), 10, 4) is None


def test_ids_reserved_structural_then_codes_by_count() -> None:
    tok = tokenizer({"B": 5, "A": 5, "C": 9, "RARE": 1, "MEDS_BIRTH": 100}, {}, min_count=2)
    assert tok.tokens[:4] == ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert tok.tokens[FIRST_CODE_ID : FIRST_CODE_ID + 10] == [f"Q{k}" for k in range(10)]
    assert tok.tokens[14:18] == gap_token_names(GAPS) == ["GAP/1-6D", "GAP/7-29D", "GAP/30-364D", "GAP/365D+"]
    assert tok.tokens[18:] == ["C", "A", "B"]  # count desc, then code; RARE below min_count; birth never a token
    assert tok.vocab_size == 21


def test_hand_made_timeline_tokens_and_ages_are_exact() -> None:
    birth = T(1960, 1, 1)
    rows = [
        (1, birth, "MEDS_BIRTH", None),
        (1, birth, "GENDER/8532", None),
        (1, T(1980, 1, 1), "CONDITION/1", None),  # earlier time, but a visit's start comes first on its day
        (1, T(1980, 1, 1, 9), "VISIT/9202", None),
        (1, T(1980, 1, 1, 10), "LAB/1", 7.5),
        (1, T(1980, 1, 1, 11), "VISIT_END/9202", None),
        (1, T(1980, 1, 4), "LAB/1", None),  # no value: no Q token
        (1, T(1980, 1, 20), "NEVER_SEEN", 3.0),  # unseen code -> UNK, its value dropped
        (1, T(1983, 1, 1), "MEDS_DEATH", None),
        (2, T(2000, 5, 5), "MEDS_BIRTH", None),
    ]
    tok = tokenizer(
        {"GENDER/8532": 1, "VISIT/9202": 1, "CONDITION/1": 1, "LAB/1": 2, "VISIT_END/9202": 1, "MEDS_DEATH": 1},
        {"LAB/1": [5, 6, 7, 8, 9]},
    )
    assert tok.value_edges == {"LAB/1": [5.0, 5.0, 6.0, 6.0, 7.0, 7.0, 8.0, 8.0, 9.0]}
    out = tok.tokenize(events(rows))
    names = [[tok.tokens[i] for i in t] for t in out.tokens.to_pylist()]
    day_1980 = (dt.date(1980, 1, 1) - dt.date(1960, 1, 1)).days
    assert names[0] == [
        "[BOS]",
        "GENDER/8532",
        "GAP/365D+",
        "VISIT/9202",
        "CONDITION/1",
        "LAB/1",
        "Q6",
        "VISIT_END/9202",
        "GAP/1-6D",
        "LAB/1",
        "GAP/7-29D",
        "[UNK]",
        "GAP/365D+",
        "MEDS_DEATH",
        "[EOS]",
    ]
    last = (dt.date(1983, 1, 1) - dt.date(1960, 1, 1)).days
    assert out.ages.to_pylist()[0] == [0, 0] + [day_1980] * 6 + [day_1980 + 3] * 2 + [day_1980 + 19] * 2 + [last] * 3
    assert names[1] == ["[BOS]", "[EOS]"] and out.ages.to_pylist()[1] == [0, 0]
    assert out.subject_id.tolist() == [1, 2]
    assert out.birth_day.tolist() == [
        (dt.date(1960, 1, 1) - dt.date(1970, 1, 1)).days,
        (dt.date(2000, 5, 5) - dt.date(1970, 1, 1)).days,
    ]
    assert out.stats == {
        "subjects": 2,
        "events": 8,
        "tokens": 17,
        "unk_tokens": 1,
        "unseen_codes": 1,
        "value_tokens": 1,
        "gap_tokens": 4,
    }


def test_value_bins_count_edges_strictly_below() -> None:
    tok = tokenizer({"LAB": 10}, {"LAB": list(range(1, 11))}, min_values=10)  # edges 1..9
    rows = [(1, T(1990, 1, 1), "MEDS_BIRTH", None)] + [(1, T(2000, 1, 1), "LAB", v) for v in (0.5, 1.0, 1.5, 9.0, 42.0)]
    tokens = tok.tokenize(events(rows)).tokens.to_pylist()[0]
    assert [tok.tokens[t] for t in tokens if tok.tokens[t].startswith("Q")] == ["Q0", "Q0", "Q1", "Q8", "Q9"]


def test_unsorted_or_birthless_input_is_an_error() -> None:
    tok = tokenizer({"X": 1}, {})
    with pytest.raises(ValueError, match="sorted"):
        tok.tokenize(events([(2, T(2000, 1, 1), "MEDS_BIRTH", None), (1, T(2000, 1, 1), "MEDS_BIRTH", None)]))
    with pytest.raises(ValueError, match="sorted"):
        tok.tokenize(events([(1, T(2000, 1, 2), "MEDS_BIRTH", None), (1, T(2000, 1, 1), "X", None)]))
    with pytest.raises(ValueError, match="no MEDS_BIRTH"):
        tok.tokenize(events([(1, T(2000, 1, 1), "X", None)]))


def test_artifact_round_trip_and_version(tmp_path) -> None:
    tok = tokenizer({"A": 3, "LAB": 4}, {"LAB": [1, 2, 3, 4]})
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    again = Tokenizer.load(path)
    assert again.tokens == tok.tokens and again.value_edges == tok.value_edges and again.version == tok.version
    assert tokenizer({"A": 3, "LAB": 5}, {"LAB": [1, 2, 3, 4]}).version != tok.version
    data = json.loads(path.read_text())
    data["tokens"][-1] = "EDITED"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="does not match its version"):
        Tokenizer.load(path)


def test_fit_statistics_see_only_the_given_train_rows() -> None:
    table = events(
        [
            (1, T(2000, 1, 1), "MEDS_BIRTH", None),
            (1, T(2001, 1, 1), "A", None),
            (2, T(2001, 1, 1), "B", None),
            (2, T(2001, 1, 1), "A", None),
        ]
    )
    counts = code_counts_table(train_rows(table, np.array([True, True, False, False])))
    assert dict(zip(counts["code"].to_pylist(), counts["n"].to_pylist())) == {"A": 1}


# ---- splits and shards ------------------------------------------------------------------------------
def test_splits_follow_the_ratios_and_are_a_function_of_the_id() -> None:
    ids = np.arange(1, 200_001, dtype=np.int64) * 7919
    codes = split_codes(ids, (0.8, 0.1, 0.1), salt=0)
    fractions = np.bincount(codes, minlength=3) / len(ids)
    assert np.allclose(fractions, [0.8, 0.1, 0.1], atol=0.005)
    assert np.array_equal(split_codes(ids[::-1], (8, 1, 1), 0), codes[::-1])  # order- and scale-free
    assert not np.array_equal(split_codes(ids, (0.8, 0.1, 0.1), salt=1), codes)
    assert np.abs(np.corrcoef(subject_uniform(ids, 0), subject_uniform(ids, 1))[0, 1]) < 0.01


def test_shards_cover_every_index_and_are_independent_of_splits() -> None:
    ids = np.arange(50_000, dtype=np.int64)
    shards = shard_of(ids, 7)
    assert set(shards.tolist()) == set(range(7)) and shards.dtype == np.int32
    train = split_codes(ids, (0.8, 0.1, 0.1), 0) == 0
    per_shard_train = [train[shards == s].mean() for s in range(7)]
    assert max(per_shard_train) - min(per_shard_train) < 0.03
    assert num_shards_for(20_000, 10_000) == 2 and num_shards_for(20_001, 10_000) == 3 and num_shards_for(5, 10, 2) == 2
