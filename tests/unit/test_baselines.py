"""Count features from MEDS events and the baselines on small synthetic event tables."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ehrfm.evaluate.baselines import BaselineConfig, main, prs_for, run_baselines, splits_for
from ehrfm.evaluate.features import CodeVocabulary, build_features, demographics
from ehrfm.evaluate.report import evaluate_predictions
from ehrfm.metrics import auroc
from ehrfm.schemas import EVENT_SCHEMA, prs_schema
from ehrfm.tasks.labeler import LABEL_SCHEMA

PT = datetime(2020, 6, 1)
SIGNAL = "CONDITION/4329847"


def event_table(subject, days_before, code, value=None) -> pa.Table:
    """Events at `days_before` days before the common prediction time (negative = after it)."""
    n = len(subject)
    times = [None if d is None else PT - timedelta(days=float(d)) for d in days_before]
    return pa.table(
        {
            "subject_id": np.asarray(subject, dtype=np.int64),
            "time": times,
            "code": list(code),
            "numeric_value": [None] * n if value is None else list(value),
            "visit_id": [None] * n,
            "visit_type": [None] * n,
        },
        schema=EVENT_SCHEMA,
    )


def label_table(subjects, y) -> pa.Table:
    return pa.table(
        {
            "subject_id": np.asarray(subjects, dtype=np.int64),
            "prediction_time": [PT] * len(subjects),
            "boolean_value": np.asarray(y, dtype=bool),
        },
        schema=LABEL_SCHEMA,
    )


def synthetic_cohort(n: int, seed: int, label_from: str) -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray]:
    """Events with 30 noise codes + one signal code; label from the signal count or from the PRS."""
    rng = np.random.default_rng(seed)
    subjects = np.arange(1, n + 1)
    signal_count = rng.poisson(1.5, size=n)
    noise_count = rng.poisson(4.0, size=n)
    prs = rng.normal(size=(n, 3)).astype(np.float32)
    if label_from == "counts":
        y = signal_count >= 2
    else:
        y = rng.random(n) < 1 / (1 + np.exp(-(2.5 * prs[:, 0] - 1.0)))
    sig_subj = np.repeat(subjects, signal_count)
    noise_subj = np.repeat(subjects, noise_count)
    noise_codes = np.char.add("CONDITION/", rng.integers(100, 130, size=noise_subj.size).astype(str))
    lab_subj = subjects
    frames = [
        event_table(sig_subj, rng.uniform(0, 2000, sig_subj.size), [SIGNAL] * sig_subj.size),
        event_table(noise_subj, rng.uniform(0, 2000, noise_subj.size), noise_codes),
        event_table(lab_subj, rng.uniform(0, 300, n), ["MEASUREMENT/3004410"] * n, rng.normal(5.6, 0.4, n)),
        event_table(subjects, [None] * n, np.where(rng.random(n) < 0.5, "Gender/F", "Gender/M")),
        event_table(subjects, rng.uniform(30, 70, n) * 365.25, ["MEDS_BIRTH"] * n),
        event_table(sig_subj, -rng.uniform(1, 300, sig_subj.size), [SIGNAL] * sig_subj.size),  # future: unseen
    ]
    split = rng.choice(["train", "val", "test"], p=[0.6, 0.2, 0.2], size=n)
    return pa.concat_tables(frames), label_table(subjects, y), split, prs


def fit_all(events, labels, split, prs) -> tuple[dict[str, float], np.ndarray]:
    train = labels.filter(pa.array(split == "train"))
    vocab = CodeVocabulary.fit(events, train, min_persons=5)
    features = build_features(events, labels, vocab)
    y = labels["boolean_value"].to_numpy(zero_copy_only=False).astype(int)
    risks = run_baselines(y, split, features, prs, np.ones(len(y), bool), BaselineConfig(hgb_max_iter=100, threads=1))
    test = split == "test"
    return {name: auroc(y[test], r[test]) for name, r in risks.items()}, y


def test_count_models_find_a_count_driven_label_and_prs_alone_does_not():
    events, labels, split, prs = synthetic_cohort(800, 0, "counts")
    scores, _ = fit_all(events, labels, split, prs)
    assert set(scores) == {"prs_lr", "counts_lr", "counts_prs_lr", "counts_hgb", "counts_prs_hgb"}
    for name in ("counts_lr", "counts_prs_lr", "counts_hgb", "counts_prs_hgb"):
        assert scores[name] > 0.95, (name, scores[name])
    assert abs(scores["prs_lr"] - 0.5) < 0.1


def test_prs_model_beats_counts_on_a_prs_driven_label():
    events, labels, split, prs = synthetic_cohort(800, 1, "prs")
    scores, _ = fit_all(events, labels, split, prs)
    assert scores["prs_lr"] > 0.75
    assert scores["prs_lr"] > scores["counts_lr"] + 0.15 and scores["prs_lr"] > scores["counts_hgb"] + 0.15
    assert scores["counts_prs_lr"] > scores["counts_lr"] + 0.1  # adding PRS helps the count model


def test_oracle_risk_bounds_the_learned_models():
    rng = np.random.default_rng(3)
    n = 4000
    prs = rng.normal(size=(n, 1)).astype(np.float32)
    oracle = 1 / (1 + np.exp(-(2.0 * prs[:, 0] - 1.0)))
    y = (rng.random(n) < oracle).astype(int)
    split = rng.choice(["train", "val", "test"], p=[0.6, 0.2, 0.2], size=n)
    risks = run_baselines(
        y, split, None, prs + rng.normal(scale=0.7, size=prs.shape), names=("prs_lr",), config=BaselineConfig(threads=1)
    )
    test = split == "test"
    truth = evaluate_predictions("oracle", y[test], oracle[test], n_boot=200)
    learned = evaluate_predictions("prs_lr", y[test], risks["prs_lr"][test], n_boot=200)
    assert truth.auroc.value > learned.auroc.value + 0.03  # the noisy PRS cannot reach the oracle
    assert truth.ece < 0.05


def test_window_counts_last_values_statics_and_age():
    events = pa.concat_tables(
        [
            event_table([1, 1, 1, 1, 2], [10, 100, 1000, -5, 3], ["A", "A", "A", "A", "A"]),
            event_table([1, 1, 1], [400, 20, 0], ["M"] * 3, [7.0, 0.0, 5.5]),  # last value at prediction time
            event_table([2], [200], ["M"], [9.0]),
            # static codes (null time): the vocabulary form, and the id form of a concept-table-less cohort
            event_table([1, 2, 3], [None] * 3, ["Gender/F", "Gender/M", "GENDER/8532"]),
            event_table([1], [365.25 * 40], ["MEDS_BIRTH"]),
        ]
    )
    labels = label_table([1, 2, 3], [True, False, False])
    vocab = CodeVocabulary.fit(events, labels, windows=(30, 365, None), min_persons=1)
    assert vocab.count_codes == ("A", "M") and vocab.value_codes == ("M",)
    features = build_features(events, labels, vocab)
    frame = dict(zip(features.names, features.to_dense().T))
    assert frame["A|count|30d"].tolist() == [1, 1, 0] and frame["A|count|365d"].tolist() == [2, 1, 0]
    assert frame["A|count|all"].tolist() == [3, 1, 0]  # the event 5 days after is never counted
    assert frame["M|count|30d"].tolist() == [2, 0, 0] and frame["M|count|all"].tolist() == [3, 1, 0]
    np.testing.assert_array_equal(frame["M|last|30d"], [5.5, np.nan, np.nan])
    np.testing.assert_array_equal(frame["M|last|all"], [5.5, 9.0, np.nan])
    assert frame["Gender/F|static"].tolist() == [1, 0, 0] and frame["GENDER/8532|static"].tolist() == [0, 0, 1]
    np.testing.assert_allclose(frame["age_years"], [40.0, np.nan, np.nan], atol=1e-6)
    assert features.matrix.nnz == int(np.count_nonzero(np.nan_to_num(features.to_dense(), nan=0)))
    assert demographics(events, labels)["sex"].to_list() == ["female", "male", "female"]
    # A last value of exactly 0 is a measurement, not a missing one.
    zero = build_features(
        events,
        label_table([1], [True]).set_column(
            1, "prediction_time", pa.array([PT - timedelta(days=20)], pa.timestamp("us"))
        ),
        vocab,
    )
    assert dict(zip(zero.names, zero.to_dense()[0]))["M|last|30d"] == 0.0


def test_vocabulary_uses_training_rows_only():
    events = pa.concat_tables(
        [
            event_table([1, 2, 3], [5, 5, 5], ["SHARED"] * 3),
            event_table([3, 3], [5, 6], ["TEST_ONLY"] * 2),
        ]
    )
    labels = label_table([1, 2, 3], [True, False, True])
    vocab = CodeVocabulary.fit(events, labels.slice(0, 2), min_persons=2)
    assert vocab.count_codes == ("SHARED",)
    assert all("TEST_ONLY" not in name for name in build_features(events, labels, vocab).names)


def test_splits_and_prs_alignment():
    labels = label_table([5, 6, 7], [True, False, True])
    splits = pl.DataFrame({"subject_id": [7, 6, 5, 9], "split": ["test", "val", "train", "train"]})
    assert splits_for(labels, splits).tolist() == ["train", "val", "test"]
    with pytest.raises(ValueError, match="splits: 1 of 3 labeled subjects have no split"):
        splits_for(labels, splits.filter(pl.col("subject_id") != 6))
    prs_table = pa.table(
        {"subject_id": [7, 5], "prs": [[1.0, 2.0], [0.0, 0.0]], "has_prs": [True, False]}, schema=prs_schema(2)
    )
    values, has = prs_for(labels, prs_table)
    assert values.tolist() == [[0, 0], [0, 0], [1, 2]] and has.tolist() == [False, False, True]


def test_baselines_command_writes_report(tmp_path):
    events, labels, split, prs = synthetic_cohort(400, 2, "counts")
    (tmp_path / "events").mkdir()
    pq.write_table(events, tmp_path / "events" / "shard-0.parquet")
    pq.write_table(labels, tmp_path / "labels.parquet")
    pq.write_table(pa.table({"subject_id": labels["subject_id"], "split": split}), tmp_path / "splits.parquet")
    has_prs = np.arange(400) % 4 != 0
    pq.write_table(
        pa.table({"subject_id": labels["subject_id"], "prs": list(prs), "has_prs": has_prs}, schema=prs_schema(3)),
        tmp_path / "prs.parquet",
    )
    ancestry = np.where(np.arange(400) % 2 == 0, "EUR", "AFR")
    pq.write_table(pa.table({"subject_id": labels["subject_id"], "ancestry": ancestry}), tmp_path / "anc.parquet")
    code = main(
        [
            "--events",
            str(tmp_path / "events"),
            "--labels",
            str(tmp_path / "labels.parquet"),
            "--splits",
            str(tmp_path / "splits.parquet"),
            "--prs",
            str(tmp_path / "prs.parquet"),
            "--ancestry",
            str(tmp_path / "anc.parquet"),
            "--recalibrate",
            "platt",
            "--out",
            str(tmp_path / "out"),
            "--n-boot",
            "100",
            "hgb_max_iter=50",
            "threads=1",
        ]
    )
    assert code == 0
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {
        name + suffix
        for name in ("prs_lr", "counts_lr", "counts_prs_lr", "counts_hgb", "counts_prs_hgb")
        for suffix in ("", " (platt)")
    }
    n_test = int((split == "test").sum())
    assert metrics["counts_hgb"]["auroc"] > 0.9 and metrics["counts_hgb"]["n"] == n_test
    assert metrics["counts_hgb (platt)"]["auroc"] == pytest.approx(metrics["counts_hgb"]["auroc"], abs=0.02)
    assert (out / "prs_deciles.png").stat().st_size > 0
    assert "| counts_lr |" in (out / "report.md").read_text()
    subgroups = pl.read_csv(out / "subgroups.csv")
    assert set(subgroups["attribute"]) == {"sex", "age", "has_prs", "ancestry"}
    # counts as published: 1..20 as "<=20", never one hidden cell alone in a partition of the test rows
    per_model = subgroups.with_columns(pl.col("n").cast(pl.String)).filter(pl.col("model") == "counts_lr")
    for _, level_rows in per_model.group_by("attribute"):
        shown = [int(v) for v in level_rows["n"] if v not in ("<=20", "hidden")]
        hidden = level_rows.height - len(shown)
        assert hidden != 1 and all(v == 0 or v > 20 for v in shown)
        assert sum(shown) == n_test if hidden == 0 else sum(shown) < n_test
    deciles = pl.read_csv(out / "prs_deciles.csv").filter(pl.col("model") == "prs_lr")
    no_prs = int((~has_prs[split == "test"]).sum())
    assert no_prs > 20 and deciles.filter(pl.col("group") == "no PRS")["n"].cast(pl.String).item() == str(no_prs)
    assert set(deciles.filter(pl.col("group") != "no PRS")["n"].cast(pl.String)) == {"<=20"}  # ~6 per decile
    assert deciles.filter(pl.col("group") != "no PRS")["observed_rate"].is_null().all()  # rate x n = events
