"""The value-bin readout: on tokens the tokenizer really wrote, the latest measurement's bin of each
chosen lab code, per recency bucket; nothing from padding or older windows."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from ehrfm.model.value_bins import ValueBinFeatures, ValueBinReadout
from ehrfm.preprocess.tokenizer import build_tokenizer, quantile_edges
from ehrfm.transfer.value_bins import readout_from_tokenizer

T = dt.datetime
BINS = 4


def make_tokenizer():
    rng = np.random.default_rng(0)
    counts = {"LAB/A": 300, "LAB/B": 200, "LAB/C": 100, "DX/1": 500}
    edges = {c: quantile_edges(rng.uniform(0, 100, 200), BINS) for c in ("LAB/A", "LAB/B", "LAB/C")}
    tok = build_tokenizer(counts, edges, min_count=1, n_bins=BINS, min_values_for_bins=20, gap_edges_days=[1, 30])
    return tok, edges


def bin_of(edges: dict, code: str, value: float) -> int:
    return int((np.asarray(edges[code]) < value).sum())  # the tokenizer's rule: edges strictly below the value


def test_readout_picks_the_most_measured_binned_codes_and_reads_real_tokens():
    tok, edges = make_tokenizer()
    readout = readout_from_tokenizer(tok, n_codes=2, recency_days=(30,))
    assert readout.codes == ("LAB/A", "LAB/B")  # DX/1 is more frequent but has no bins; LAB/C ranks third
    assert readout.code_ids == (tok.token_id["LAB/A"], tok.token_id["LAB/B"])
    assert readout.buckets == (30, None) and readout.width == 2 * 2 * BINS
    birth = T(1960, 1, 1)
    rows = [  # (subject, time, code, value), in events/ order
        (0, birth, "MEDS_BIRTH", None),
        (0, T(2000, 1, 1), "LAB/A", 10.0),
        (0, T(2000, 1, 1), "DX/1", None),
        (0, T(2000, 3, 1), "LAB/A", 90.0),  # A's latest: 92 days before the end, so only "anywhere"
        (0, T(2000, 5, 1), "LAB/B", 55.0),
        (0, T(2000, 6, 1), "LAB/B", 5.0),  # B's latest, inside 30 days of the end
        (0, T(2000, 6, 1), "LAB/C", 50.0),  # not a chosen code
        (1, birth, "MEDS_BIRTH", None),
        (1, T(2001, 1, 1), "DX/1", None),  # no measurement at all
    ]
    events = pa.table(
        {
            "subject_id": pa.array([r[0] for r in rows], pa.int64()),
            "time": pa.array([r[1] for r in rows], pa.timestamp("us")),
            "code": pa.array([r[2] for r in rows], pa.string()),
            "numeric_value": pa.array([r[3] for r in rows], pa.float32()),
        }
    )
    timelines = tok.tokenize(events)
    lists = [np.asarray(t.as_py()) for t in timelines.tokens]
    age_lists = [np.asarray(a.as_py()) for a in timelines.ages]
    width = max(map(len, lists)) + 3
    tokens = np.zeros((2, width), np.int64)
    ages = np.zeros((2, width), np.int32)
    for i, (t, a) in enumerate(zip(lists, age_lists)):
        tokens[i, : len(t)], ages[i, : len(a)] = t, a
    # padding after the real tokens that looks like a measurement must be ignored
    tokens[0, len(lists[0]) : len(lists[0]) + 2] = [tok.token_id["LAB/A"], readout.value_ids[0]]
    length = np.array([len(t) for t in lists])
    got = readout.features(tokens, ages, length).reshape(2, 2, 2, BINS)  # (row, recency, code, bin)

    within_30 = np.zeros((2, BINS))
    within_30[1, bin_of(edges, "LAB/B", 5.0)] = 1
    anywhere = np.zeros((2, BINS))
    anywhere[0, bin_of(edges, "LAB/A", 90.0)] = 1  # A's latest, not its first
    anywhere[1, bin_of(edges, "LAB/B", 5.0)] = 1
    np.testing.assert_array_equal(got[0, 0], within_30)
    np.testing.assert_array_equal(got[0, 1], anywhere)
    assert bin_of(edges, "LAB/A", 90.0) != bin_of(edges, "LAB/A", 10.0)  # the test can tell first from latest
    assert not got[1].any()


def test_whole_history_inputs_read_the_newest_window_only():
    readout = ValueBinReadout(("A",), (20,), (5, 6, 7), ())  # one bucket: anywhere in the window
    old, new = [2, 20, 5, 0], [20, 7, 0, 0]
    tokens = np.array([[old, new]])  # [n=1, W=2, T=4], oldest window first
    ages = np.array([[[0, 1, 1, 0], [9, 9, 0, 0]]])
    length = np.array([[3, 2]])
    np.testing.assert_array_equal(readout.features(tokens, ages, length), [[0, 0, 1]])
    empty = readout.features(tokens[:, :, :1], ages[:, :, :1], np.array([[1, 1]]))
    assert empty.shape == (1, 3) and not empty.any()


def test_readout_refuses_a_tokenizer_without_value_bins_and_bad_settings():
    tok = build_tokenizer({"DX/1": 5}, {}, min_count=1, n_bins=BINS, min_values_for_bins=20, gap_edges_days=[1])
    with pytest.raises(ValueError, match="no code with value bins"):
        readout_from_tokenizer(tok, 5)
    binned, _ = make_tokenizer()
    with pytest.raises(ValueError, match="n_codes"):
        readout_from_tokenizer(binned, 0)
    with pytest.raises(ValueError, match="recency_days"):
        readout_from_tokenizer(binned, 2, (-1,))
    with pytest.raises(ValueError, match="as many"):
        ValueBinReadout(("A", "B"), (20,), (5, 6))


def test_the_module_matches_the_numpy_call_and_moves_no_weights():
    rng = np.random.default_rng(3)
    readout = ValueBinReadout(("A", "B"), (20, 21), (5, 6, 7), (10,))
    tokens = rng.choice([2, 5, 6, 7, 20, 21, 30], size=(16, 24))
    ages = np.sort(rng.integers(0, 60, size=(16, 24)), axis=1)
    length = rng.integers(1, 25, size=16)
    module = ValueBinFeatures(readout)
    assert module.state_dict() == {}  # lookups are rebuilt from head.json, never saved as weights
    got = module(torch.as_tensor(tokens), torch.as_tensor(ages), torch.as_tensor(length)).numpy()
    np.testing.assert_array_equal(got, readout.features(tokens, ages, length))
    # a slow reference: per row and code, the latest measured bin within each bucket
    want = np.zeros((16, 2, 2, 3), np.float32)
    for i in range(16):
        end = ages[i, length[i] - 1]
        for p in range(1, length[i]):
            code, value = tokens[i, p - 1], tokens[i, p]
            if code in (20, 21) and value in (5, 6, 7):
                for b, bound in enumerate((10, None)):
                    if bound is None or end - ages[i, p] <= bound:
                        want[i, b, code - 20] = 0
                        want[i, b, code - 20, value - 5] = 1
    np.testing.assert_array_equal(got, want.reshape(16, -1))
    assert got.any()


def test_a_config_default_asks_for_a_readout_only_where_values_were_binned(tmp_path, capsys):
    from ehrfm.transfer.value_bins import readout_if_binned

    binned, _ = make_tokenizer()
    binned.save(tmp_path / "binned.json")
    plain = build_tokenizer({"DX/1": 5}, {}, min_count=1, n_bins=BINS, min_values_for_bins=20, gap_edges_days=[1])
    plain.save(tmp_path / "plain.json")
    assert readout_if_binned(tmp_path / "binned.json", 0) is None  # asked for none
    assert readout_if_binned(tmp_path / "binned.json", 40).codes == ("LAB/A", "LAB/B", "LAB/C")  # all it has
    assert readout_if_binned(tmp_path / "plain.json", 40) is None
    assert "plain.json: no code has value bins, so the head reads the states alone" in capsys.readouterr().out


def both_encodings(encoding: str = "one_hot") -> ValueBinReadout:
    """Codes A, B (ids 20, 21) with bins 5-8 and a 10-day bucket: the encoding tests' readout."""
    return ValueBinReadout(("A", "B"), (20, 21), (5, 6, 7, 8), (10,), encoding=encoding)


def random_windows(seed: int, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows of 24 tokens mixing those codes, their bins and other tokens; random real lengths."""
    rng = np.random.default_rng(seed)
    tokens = rng.choice([2, 5, 6, 7, 8, 20, 21, 30], size=(rows, 24))
    ages = np.sort(rng.integers(0, 60, size=(rows, 24)), axis=1)
    return tokens, ages, rng.integers(1, 25, size=rows)


def test_cumulative_columns_are_the_one_hots_summed_from_each_bin_up():
    """Cumulative column j is "measured and bin >= j": the running sum of the one-hot from the top,
    so column 0 is "measured" and a row without the code stays all zero."""
    one_hot, cumulative, (tokens, ages, length) = both_encodings(), both_encodings("cumulative"), random_windows(5, 32)
    hot = one_hot.features(tokens, ages, length).reshape(32, 2, 2, 4)
    got = cumulative.features(tokens, ages, length).reshape(32, 2, 2, 4)
    want = np.flip(np.cumsum(np.flip(hot, -1), -1), -1)
    np.testing.assert_array_equal(got, want)
    assert got.max() == 1 and (got[..., 0] == hot.sum(-1)).all()
    assert (got.sum(-1) > 1).any() and not np.array_equal(got, hot)  # the data holds bins above the lowest
    with pytest.raises(ValueError, match="encoding"):
        ValueBinReadout(("A",), (20,), (5, 6), encoding="thermo")


def test_the_encoding_travels_in_the_head_spec_and_old_specs_read_one_hot():
    from ehrfm.model.risk import HeadSpec

    readout = ValueBinReadout(("A",), (20,), (5, 6), (30,), encoding="cumulative")
    spec = HeadSpec(task="t2d", horizon_days=730, context=8, **HeadSpec.value_fields(readout))
    assert HeadSpec.from_json(spec.to_json()).value_readout() == readout
    old = json.loads(spec.to_json())
    del old["value_encoding"]  # a head.json written before the field existed
    assert HeadSpec.from_json(json.dumps(old)).value_readout().encoding == "one_hot"


def test_bin_numbers_are_the_same_for_either_encoding_and_nan_where_unmeasured():
    """A boosted head reads one number per (bucket, code) slot: the bin of the latest measurement,
    NaN where there is none, whichever columns the readout wrote."""
    one_hot, cumulative, (tokens, ages, length) = both_encodings(), both_encodings("cumulative"), random_windows(6, 40)
    hot = one_hot.features(tokens, ages, length)
    numbers = one_hot.bin_numbers(hot)
    assert numbers.shape == (40, 2 * 2)  # (bucket, code) slots
    np.testing.assert_array_equal(numbers, cumulative.bin_numbers(cumulative.features(tokens, ages, length)))
    slots = hot.reshape(40, 4, BINS)
    measured = slots.any(-1)
    assert np.isnan(numbers[~measured]).all() and measured.any() and not measured.all()
    np.testing.assert_array_equal(numbers[measured], slots.argmax(-1)[measured])
    assert len(np.unique(numbers[measured])) > 1  # the data holds more than one bin
    with pytest.raises(ValueError, match="readout columns"):
        one_hot.bin_numbers(hot[:, :-1])
