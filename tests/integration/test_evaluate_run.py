"""`ehrfm evaluate` on a tiny hand-made task with the session's MLflow server: report, oracle, PRS gain,
the MLflow run."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from sklearn.metrics import average_precision_score, roc_auc_score

from ehrfm.evaluate.baselines import BASELINES, BaselineConfig
from ehrfm.evaluate.meds_dev import validate_predictions
from ehrfm.evaluate.report import counts_cell
from ehrfm.evaluate.run import evaluate_all
from ehrfm_synthetic.oracle import oracle_t2d_risk
from ehrfm_synthetic.truth import load_truth
from tests.support.evaluate_factory import PT, make_task
from tests.support.published_counts import csv_count_cells, markdown_count_cells, small_numbers

pytestmark = pytest.mark.mlflow


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, mlflow_server):
    root = tmp_path_factory.mktemp("evaluate")
    task = make_task(root)
    summary = evaluate_all(
        task["data"],
        task["labels"],
        root / "out",
        predictions=task["predictions"],
        default_predictions=task["default_predictions"],
        cohort=task["cohort"],
        n_boot=200,
        recalibrate="platt",
        baseline_config=BaselineConfig(hgb_max_iter=30, threads=1, min_persons_per_code=3),
        tracking_uri=mlflow_server,
        meds_dev_dir=root / "meds_dev",
    )
    return task, summary, root / "out", mlflow_server


def test_meds_dev_prediction_tables_cover_the_test_rows_and_validate(evaluated):
    task, summary, out, _ = evaluated
    meds_dev = out.parent / "meds_dev"
    files = {p.stem: p for p in meds_dev.glob("*.parquet")}
    assert "finetuned" in files and "counts_lr" in files
    assert not list(out.rglob("*meds_dev*"))  # person-level rows stay out of the report folder
    finetuned = pq.read_table(files["finetuned"])
    validate_predictions(finetuned)
    predictions = pq.read_table(task["predictions"]).to_pandas()
    test = predictions[predictions["split"] == "test"].sort_values(["subject_id", "prediction_time"])
    written = finetuned.to_pandas().sort_values(["subject_id", "prediction_time"])
    assert len(written) == len(test) == summary["n_test"]
    assert np.allclose(written["predicted_boolean_probability"].to_numpy(), test["risk"].to_numpy())
    assert (written["boolean_value"].to_numpy() == test["label"].to_numpy()).all()
    assert (written["predicted_boolean_value"] == (written["predicted_boolean_probability"] >= 0.5)).all()


def test_report_has_every_model_with_cis_and_the_prs_gain(evaluated):
    task, summary, out, _ = evaluated
    test = task["split"] == "test"
    y = task["y"][test]
    report = (out / "report.md").read_text()
    expected = [
        "finetuned",
        "finetuned_prs_masked",
        "finetuned_default",
        *BASELINES,
        "oracle_genetic",
        "oracle_group_mean",
        "finetuned (platt)",
        "counts_lr (platt)",
    ]
    for name in expected:
        assert re.search(
            rf"^\| {re.escape(name)} \| {re.escape(counts_cell(50, int(y.sum())))} \| \d\.\d{{3}} \[\d\.\d{{3}}, \d\.\d{{3}}\] \| "
            rf"\d\.\d{{3}} \[\d\.\d{{3}}, \d\.\d{{3}}\] \|",
            report,
            re.M,
        ), name
    assert set(summary["models"]) >= set(expected)
    fin, masked = summary["models"]["finetuned"], summary["models"]["finetuned_prs_masked"]
    assert fin["auroc"] == pytest.approx(roc_auc_score(y, task["risk"][test]), abs=1e-12)
    assert fin["auprc"] == pytest.approx(average_precision_score(y, task["risk"][test]), abs=1e-12)
    gain = summary["comparisons"]["prs_gain"]
    assert gain["auroc_difference"] == pytest.approx(fin["auroc"] - masked["auroc"], abs=1e-12)
    assert gain["ci_low"] <= gain["auroc_difference"] <= gain["ci_high"]
    assert f"PRS gain = AUROC(finetuned) - AUROC(finetuned_prs_masked) = {gain['auroc_difference']:.3f}" in report
    default = summary["models"]["finetuned_default"]
    assert default["auroc"] == pytest.approx(roc_auc_score(y, task["default_risk"][test]), abs=1e-12)
    tuning = summary["comparisons"]["tuning_gain"]
    assert tuning["auroc_difference"] == pytest.approx(fin["auroc"] - default["auroc"], abs=1e-12)
    assert tuning["auroc_difference"] > 0  # the noisier default ranks worse
    assert f"Tuning gain = AUROC(finetuned) - AUROC(finetuned_default) = {tuning['auroc_difference']:.3f}" in report
    best = max(BASELINES, key=lambda b: summary["models"][b]["auroc"])
    assert summary["best_baseline"] == best and f"Best baseline: {best}" in report
    beats = all(fin["auroc"] > summary["models"][b]["auroc"] for b in BASELINES)
    judged = summary["n_test_positive"] >= 300  # below that no target is judged, whatever the point estimates
    assert summary["acceptance"]["judged"] is judged
    assert summary["acceptance"]["beats_every_baseline"] == (beats if judged else None)
    assert gain["minimum_detectable_difference"] == pytest.approx(2.8016 * gain["se"], rel=1e-4) and gain["se"] > 0
    assert "Minimum detectable AUROC difference on this sample" in report
    assert json.loads((out / "report.json").read_text())["comparisons"]["prs_gain"] == gain
    for name in (
        "roc.png",
        "pr.png",
        "calibration.png",
        "prs_deciles.png",
        "subgroups.csv",
        "subgroups.md",
        "prs_deciles.csv",
    ):
        assert (out / name).stat().st_size > 0, name
    subgroup_md = (out / "subgroups.md").read_text()
    assert all(f"| {a} |" in subgroup_md for a in ("sex", "age", "has_prs", "ancestry"))


def test_no_person_count_from_1_to_20_is_published(evaluated):
    """All of Us rule on a 50-row test split: report.md, subgroup tables, report.json, MLflow params."""
    _, summary, out, uri = evaluated
    report, subgroup_md = (out / "report.md").read_text(), (out / "subgroups.md").read_text()
    header = re.match(r"# Evaluation on (\S+) test rows \((\S+) events\)", report)
    cells = [*header.groups(), *markdown_count_cells(report), *markdown_count_cells(subgroup_md)]
    cells += csv_count_cells(out / "subgroups.csv") + csv_count_cells(out / "prs_deciles.csv")
    assert len(cells) > 100 and small_numbers(cells) == []
    assert "<=20" in cells  # the tiny split has small cells: the rule was exercised, not vacuous
    published = json.loads((out / "report.json").read_text())
    counts = [published["n_test"], published["n_test_positive"]]
    counts += [m[k] for m in published["models"].values() for k in ("n", "n_positive")]
    assert small_numbers(str(c) for c in counts) == []
    params = MlflowClient(tracking_uri=uri).get_run(summary["mlflow_run_id"]).data.params
    assert small_numbers([params["n_test"], params["n_test_positive"]]) == []


def test_oracle_auroc_from_the_truth_matches_scikit_learn(evaluated):
    task, summary, out, _ = evaluated
    test = task["split"] == "test"
    truth = load_truth(task["cohort"])
    times = np.full(test.sum(), np.datetime64(PT, "us"))
    expected = {}
    for name, genetics in (("oracle_genetic", True), ("oracle_group_mean", False)):
        risk = oracle_t2d_risk(truth, task["subjects"][test], times, 730, use_genetics=genetics)
        begun = np.isnan(risk)
        expected[name] = roc_auc_score(task["y"][test], np.where(begun, 1.0, risk))
        assert summary["models"][name]["auroc"] == pytest.approx(expected[name], abs=1e-12)
    assert summary["oracle"]["test_rows_already_begun"] == int(begun.sum()) > 0
    headroom = summary["comparisons"]["oracle_genetic_headroom"]["auroc_difference"]
    assert headroom == pytest.approx(expected["oracle_genetic"] - expected["oracle_group_mean"], abs=1e-12)
    gap = summary["comparisons"]["gap_to_oracle"]
    assert gap["reference"] == "finetuned"
    assert gap["auroc_difference"] == pytest.approx(
        expected["oracle_genetic"] - summary["models"]["finetuned"]["auroc"]
    )
    assert summary["decile_pgs"] == "PGS000002"  # the truth's T2D score, not the first column


def test_prs_use_and_the_baselines_own_prs_gain(evaluated):
    task, summary, out, _ = evaluated
    test = task["split"] == "test"
    prs_table = pq.read_table(task["data"] / "prs" / "part-00000.parquet")
    prs, has = np.asarray(prs_table["prs"].to_pylist())[:, 1], prs_table["has_prs"].to_numpy()
    genotyped = test & has
    shift = np.log(task["risk"] / (1 - task["risk"])) - np.log(task["masked"] / (1 - task["masked"]))
    use = summary["prs_use"]
    assert use["pgs_id"] == "PGS000002" and use["n_genotyped"] == int(genotyped.sum())
    assert use["corr_with_pgs"] == pytest.approx(np.corrcoef(shift[genotyped], prs[genotyped])[0, 1], abs=1e-6)
    assert use["logit_shift_sd"] == pytest.approx(shift[genotyped].std(), rel=1e-6)
    assert 0.7 < use["ci_low"] < use["corr_with_pgs"] < use["ci_high"]  # the fixture's logit uses 1.5 x PGS000002
    report = (out / "report.md").read_text()
    assert f"correlates with PGS000002 at r = {use['corr_with_pgs']:.2f}" in report
    hgb = summary["comparisons"]["baseline_prs_gain"]
    assert (hgb["model"], hgb["reference"]) == ("counts_prs_hgb", "counts_hgb")
    assert hgb["auroc_difference"] == pytest.approx(
        summary["models"]["counts_prs_hgb"]["auroc"] - summary["models"]["counts_hgb"]["auroc"], abs=1e-12
    )
    assert f"AUROC(counts_prs_hgb) - AUROC(counts_hgb) = {hgb['auroc_difference']:.3f}" in report


def test_mlflow_run_records_the_metrics_and_report(evaluated):
    _, summary, _, uri = evaluated
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(summary["mlflow_run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "ehrfm-evaluate"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the runs table
    metrics = run.data.metrics
    for name in ("finetuned", "counts_prs_hgb", "oracle_genetic"):
        assert metrics[f"{name}/auroc"] == pytest.approx(summary["models"][name]["auroc"])
        assert metrics[f"{name}/auroc_ci_low"] == pytest.approx(summary["models"][name]["auroc_ci_low"])
    gain = summary["comparisons"]["prs_gain"]
    assert metrics["comparison/prs_gain/auroc_difference"] == pytest.approx(gain["auroc_difference"])
    assert metrics["comparison/prs_gain/ci_high"] == pytest.approx(gain["ci_high"])
    assert metrics["prs_use/corr_with_pgs"] == pytest.approx(summary["prs_use"]["corr_with_pgs"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/report.md", "evaluation/report.json", "evaluation/roc.png"} <= artifacts
