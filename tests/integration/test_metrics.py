"""The evaluation report's tables and figures, logged to the session's MLflow server."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from ehrfm.evaluate.report import evaluate_predictions, log_to_mlflow, markdown_table, write_report

pytestmark = pytest.mark.mlflow


def scored_sample(n: int, seed: int, ties: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.25
    s = rng.normal(size=n) + 0.8 * y
    return y, (np.round(s, 1) if ties else s)


def test_report_table_figures_and_mlflow_logging(tmp_path, mlflow_server):
    y, s = scored_sample(500, 12, ties=False)
    risks = {"good": 1 / (1 + np.exp(-2 * s)), "noise": np.random.default_rng(0).random(500)}
    results = [evaluate_predictions(name, y, r, n_boot=200) for name, r in risks.items()]
    results.append(evaluate_predictions("oracle (liability)", y, s, n_boot=200))
    table = markdown_table(results)
    lines = table.strip().splitlines()
    assert lines[0] == "| model | n (events) | AUROC [95% CI] | AUPRC [95% CI] | ECE |" and len(lines) == 5
    good = results[0]
    assert lines[2] == (
        f"| good | 500 ({int(y.sum())}) | {good.auroc.value:.3f} [{good.auroc.lower:.3f}, "
        f"{good.auroc.upper:.3f}] | {good.auprc.value:.3f} [{good.auprc.lower:.3f}, "
        f"{good.auprc.upper:.3f}] | {good.ece:.3f} |"
    )
    assert lines[4].endswith("| n/a |")  # a liability is not a probability: no ECE
    prs = np.where(np.arange(500) < 50, np.nan, s + np.random.default_rng(1).normal(size=500))
    paths = write_report(results, tmp_path / "eval", y, risks, prs)
    assert sorted(p.name for p in paths) == sorted(
        ["report.md", "metrics.json", "roc.png", "pr.png", "calibration.png", "prs_deciles.png"]
    )
    for path in paths:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000

    assert log_to_mlflow(results, paths) is False  # no active run: nothing logged
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server)
    try:
        mlflow.set_experiment("evaluate-report")
        with mlflow.start_run() as run:
            assert log_to_mlflow(results, paths) is True
    finally:
        mlflow.set_tracking_uri(previous_uri)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    logged = client.get_run(run.info.run_id).data.metrics
    assert logged["good/auroc"] == pytest.approx(good.auroc.value)
    assert logged["oracle _liability_/auroc"] == pytest.approx(results[2].auroc.value)
    assert "oracle _liability_/ece" not in logged  # NaN metrics are not logged
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert artifacts == {f"evaluation/{p.name}" for p in paths}
