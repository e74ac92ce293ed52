"""`ehrfm evaluate` without MLflow: the paired bootstrap against a direct loop, misaligned predictions refused,
the command's table without fine-tune predictions (the full evaluation with MLflow: tests/integration)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from ehrfm.cli import run_command
from ehrfm.evaluate.alignment import align_scores
from ehrfm.evaluate.run import Comparison, report_markdown
from ehrfm.metrics import Estimate, bootstrap_difference, bootstrap_metric, bootstrap_weights
from tests.support.evaluate_factory import N, make_task


def test_paired_bootstrap_difference_matches_a_direct_loop():
    rng = np.random.default_rng(4)
    n, n_boot, seed = 60, 150, 11
    y = rng.random(n) < 0.3
    a = np.round(rng.normal(size=n) + 1.0 * y, 1)  # ties, as real risks have
    b = rng.normal(size=n) + 0.4 * y
    for metric, reference in (("auroc", roc_auc_score), ("auprc", average_precision_score)):
        est = bootstrap_difference(metric, y, a, b, n_boot=n_boot, seed=seed)
        assert est.value == pytest.approx(reference(y, a) - reference(y, b), abs=1e-12)
        weights = bootstrap_weights(n, n_boot, np.random.default_rng(seed)).astype(int)
        diffs = []
        for w in weights:
            idx = np.repeat(np.arange(n), w)
            if 0 < y[idx].sum() < idx.size:
                diffs.append(reference(y[idx], a[idx]) - reference(y[idx], b[idx]))
        assert est.n_boot_valid == len(diffs) > 0.9 * n_boot
        assert (est.lower, est.upper) == pytest.approx(tuple(np.quantile(diffs, [0.025, 0.975])), abs=1e-12)
        assert est.se == pytest.approx(np.std(diffs, ddof=1), abs=1e-12)
        # 80% power at two-sided 5%: (1.960 + 0.842) standard errors
        assert est.minimum_detectable() == pytest.approx(2.8016 * est.se, rel=1e-4)
        assert est.lower < est.value < est.upper
        single = bootstrap_metric(metric, y, a, n_boot=n_boot, seed=seed)
        assert single.n_boot_valid == est.n_boot_valid  # the same resamples as the single-model bootstrap


def test_mismatched_predictions_are_refused_with_counts(tmp_path):
    task = make_task(tmp_path)
    frame = pq.read_table(task["predictions"])
    columns = {"finetuned": "risk"}
    test_rows = int((task["split"] == "test").sum())
    short = tmp_path / "short.parquet"
    pq.write_table(frame.slice(0, frame.num_rows - 3), short)
    with pytest.raises(ValueError, match=rf"short.parquet: scores {test_rows - 3} of {test_rows} test label rows"):
        align_scores(short, task["labels_table"], task["split"], columns)
    stranger = tmp_path / "stranger.parquet"
    ids = frame["subject_id"].to_numpy().copy()
    ids[:2] = [-1, -2]
    pq.write_table(frame.set_column(0, "subject_id", pa.array(ids)), stranger)
    with pytest.raises(ValueError, match=rf"2 of {frame.num_rows} rows match no label row \({N} label rows\)"):
        align_scores(stranger, task["labels_table"], task["split"], columns)
    flipped = tmp_path / "flipped.parquet"
    labels = frame["label"].to_numpy(zero_copy_only=False).copy()
    labels[:5] = ~labels[:5]
    pq.write_table(frame.set_column(frame.schema.get_field_index("label"), "label", pa.array(labels)), flipped)
    with pytest.raises(ValueError, match=rf"'label' disagrees with the labels/splits on 5 of {frame.num_rows} rows"):
        align_scores(flipped, task["labels_table"], task["split"], columns)
    repeated = tmp_path / "repeated.parquet"
    pq.write_table(pa.concat_tables([frame, frame.slice(0, 4)]), repeated)
    with pytest.raises(ValueError, match=rf"4 of {frame.num_rows + 4} rows repeat"):
        align_scores(repeated, task["labels_table"], task["split"], columns)
    # the command refuses it before fitting anything
    with pytest.raises(ValueError, match="short.parquet: scores"):
        run_command(
            "evaluate",
            [
                "--data",
                str(task["data"]),
                "--labels",
                str(task["labels"]),
                "--predictions",
                str(short),
                "--out",
                str(tmp_path / "out"),
            ],
        )


def test_scores_of_every_label_row_may_come_in_several_files_and_none_may_be_missing_or_repeated(tmp_path):
    """A cross-fit compares on all label rows: zero-shot run once for val+test and once for train is
    read as one file; a row scored twice or not at all is refused with the counts."""
    task = make_task(tmp_path)
    scored = pq.read_table(task["predictions"])  # the val and test rows
    labels, split = task["labels_table"], task["split"]
    train = labels.filter(pa.array(split == "train"))
    train_file = tmp_path / "train.parquet"
    pq.write_table(
        pa.table(
            {
                "subject_id": train["subject_id"],
                "prediction_time": train["prediction_time"],
                "risk": np.full(train.num_rows, 0.25),
            }
        ),
        train_file,
    )
    risk = align_scores([task["predictions"], train_file], labels, split, {"zs": "risk"}, required_split=None)["zs"]
    assert np.isfinite(risk).all() and (risk[split == "train"] == 0.25).all()
    np.testing.assert_array_equal(risk[split != "train"], scored["risk"].to_numpy())
    with pytest.raises(ValueError, match=rf"predictions.parquet: scores {N - train.num_rows} of {N} label rows"):
        align_scores(task["predictions"], labels, split, {"zs": "risk"}, required_split=None)
    with pytest.raises(ValueError, match=rf"train.parquet, .*overlap.parquet: 3 of {N + 3} rows repeat"):
        overlap = tmp_path / "overlap.parquet"
        pq.write_table(pq.read_table(train_file).slice(0, 3), overlap)
        align_scores([task["predictions"], train_file, overlap], labels, split, {"zs": "risk"}, required_split=None)


def test_cli_prints_the_table_without_fine_tune_predictions(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    task = make_task(tmp_path, seed=1)
    code = run_command(
        "evaluate",
        [
            "--data",
            str(task["data"]),
            "--labels",
            str(task["labels"]),
            "--out",
            str(tmp_path / "out"),
            "--n-boot",
            "50",
            "--baselines",
            "prs_lr",
            "--decile-pgs",
            "PGS000003",
            "threads=1",
        ],
    )
    printed = capsys.readouterr().out
    assert code == 0 and "| prs_lr | 50 (" in printed and "finetuned" not in printed
    summary = json.loads((tmp_path / "out" / "report.json").read_text())
    assert summary["headline"] == "prs_lr" and summary["oracle"] is None and summary["decile_pgs"] == "PGS000003"
    # far fewer than 300 test events: no target is judged
    assert summary["acceptance"] == {
        "judged": False,
        "prs_gain_share_of_baseline": None,
        "beats_every_baseline": None,
    }
    report = (tmp_path / "out" / "report.md").read_text()
    assert " meets " not in report  # (no paired comparison here: only one model was evaluated)
    assert summary["mlflow_run_id"] is None  # no tracking URI given


def test_the_mdd_shrinks_with_events_and_a_target_is_judged_only_on_300_or_more():
    rng = np.random.default_rng(5)

    def paired(n_events: int) -> Estimate:
        y = np.r_[np.ones(n_events, bool), np.zeros(9 * n_events, bool)]
        base = rng.normal(size=y.size) + 1.0 * y
        return bootstrap_difference("auroc", y, base + rng.normal(0, 0.3, y.size), base, n_boot=200, seed=1)

    small, large = paired(40), paired(400)
    assert large.minimum_detectable() < 0.5 * small.minimum_detectable()  # ~ 1/sqrt(n): 10x the events

    def report(n_events: int, gain: float, baseline_gain: float) -> str:
        summary = {
            "n_test": 20 * n_events,
            "n_test_positive": n_events,
            "n_boot": 200,
            "seed": 1,
            "best_baseline": None,
            "oracle": None,
            "decile_pgs": None,
        }
        comparisons = [
            Comparison(
                "prs_gain",
                "finetuned",
                "finetuned_prs_masked",
                Estimate(gain, gain - 0.01, gain + 0.01, 200, 200, 0.005),
            ),
            Comparison(
                "baseline_prs_gain",
                "counts_prs_hgb",
                "counts_hgb",
                Estimate(baseline_gain, baseline_gain - 0.01, baseline_gain + 0.01, 200, 200, 0.005),
            ),
        ]
        return report_markdown(summary, [], comparisons)

    # 0.02 is 0.67 of the baseline's 0.03: meets the 0.6 share, but only a sample of 300+ events may say so
    assert "not judged on this sample" in report(299, 0.02, 0.03) and "meets" not in report(299, 0.02, 0.03)
    assert "the point estimate meets it" in report(300, 0.02, 0.03)
    assert "the point estimate falls short of it" in report(300, 0.01, 0.03)
    assert "up to 0.014" in report(300, 0.02, 0.03)  # 2.80 x 0.005
