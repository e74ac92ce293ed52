"""One evaluation summary per model, a markdown table of them, and logging to MLflow.

The report and MLflow hold aggregate numbers and figures only (no person-level values), person
counts under the small-count rule (ehrfm.small_counts).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ehrfm.evaluate.calibration import expected_calibration_error
from ehrfm.evaluate.plots import save_figures
from ehrfm.evaluate.stratify import public_table, risk_by_prs_decile, subgroup_table
from ehrfm.metrics import DEFAULT_BOOTSTRAP, Estimate, auprc_ci, auroc_ci
from ehrfm.small_counts import binary_hidden, public_json, show


@dataclass(frozen=True)
class ModelResult:
    """Discrimination with bootstrap CIs and calibration for one model on one evaluation set."""

    name: str
    n: int | str  # a str is a count already suppressed (read back from a published report.json)
    n_positive: int | str
    auroc: Estimate
    auprc: Estimate
    ece: float  # NaN when the scores are not probabilities (e.g. an oracle liability)

    def metrics(self) -> dict[str, float]:
        values = {
            "auroc": self.auroc.value,
            "auroc_ci_low": self.auroc.lower,
            "auroc_ci_high": self.auroc.upper,
            "auprc": self.auprc.value,
            "auprc_ci_low": self.auprc.lower,
            "auprc_ci_high": self.auprc.upper,
            "ece": self.ece,
            "n": self.n,
            "n_positive": self.n_positive,
        }
        return {k: v if isinstance(v, str) else float(v) for k, v in values.items()}


def evaluate_predictions(
    name: str, y_true, y_score, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0, groups=None
) -> ModelResult:
    """AUROC, AUPRC (seeded bootstrap 95% CIs) and ECE of one model's scores (the binning of the
    calibration plot: `expected_calibration_error`'s defaults). `groups` (subject ids): resample
    persons, not rows, when a person has several label rows."""
    y = np.asarray(y_true).astype(bool).ravel()
    score = np.asarray(y_score, dtype=np.float64).ravel()
    is_probability = score.size > 0 and np.isfinite(score).all() and score.min() >= 0 and score.max() <= 1
    return ModelResult(
        name=name,
        n=int(y.size),
        n_positive=int(y.sum()),
        auroc=auroc_ci(y, score, n_boot, seed, groups=groups),
        auprc=auprc_ci(y, score, n_boot, seed, groups=groups),
        ece=expected_calibration_error(y, score) if is_probability else float("nan"),
    )


def markdown_table(results: list[ModelResult], digits: int = 3) -> str:
    """| model | n (events) | AUROC [95% CI] | AUPRC [95% CI] | ECE |, counts under the small-count rule."""
    lines = ["| model | n (events) | AUROC [95% CI] | AUPRC [95% CI] | ECE |", "|---|---|---|---|---|"]
    for r in results:
        ece = "n/a" if np.isnan(r.ece) else f"{r.ece:.{digits}f}"
        lines.append(
            f"| {r.name} | {counts_cell(r.n, r.n_positive)} | {r.auroc.fmt(digits)} | {r.auprc.fmt(digits)} | {ece} |"
        )
    return "\n".join(lines) + "\n"


def counts_cell(n, events) -> str:
    """`n (events)` as published: each shown by the rule, events hidden with small non-events."""
    hide_n, hide_events = binary_hidden(n, events)
    return f"{show(n, hidden=hide_n)} ({show(events, hidden=hide_events)})"


def write_report(
    results: list[ModelResult], out_dir: Path, y_true=None, risks: dict | None = None, prs=None
) -> list[Path]:
    """report.md + metrics.json, and the PNG figures when labels and risks are given. Returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / "report.md"
    report.write_text("# Evaluation\n\n" + markdown_table(results))
    metrics = out_dir / "metrics.json"
    metrics.write_text(json.dumps(public_json({r.name: r.metrics() for r in results}), indent=2))
    paths = [report, metrics]
    if y_true is not None and risks:
        probabilities = {k: v for k, v in risks.items() if np.min(v) >= 0 and np.max(v) <= 1}
        paths += save_figures(out_dir, y_true, probabilities, prs)
    return paths


def write_stratified(
    out_dir: Path,
    y_true,
    risks: dict,
    groups: dict,
    prs=None,
    n_boot: int = 200,
    seed: int = 0,
    persons=None,
) -> list[Path]:
    """subgroups.csv (every model x subgroup level) and prs_deciles.csv (every model x decile), as
    published: counts under the small-count rule, each model's levels of an attribute (its deciles)
    one partition of the test persons."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = [
        subgroup_table(y_true, risk, groups, n_boot, seed, persons=persons).insert_column(
            0, pl.lit(name).alias("model")
        )
        for name, risk in risks.items()
    ]
    paths = [out_dir / "subgroups.csv"]
    public_table(pl.concat(tables), ("model", "attribute"), ("prevalence",)).write_csv(paths[0])
    if prs is not None:
        deciles = [
            risk_by_prs_decile(y_true, prs, risk).insert_column(0, pl.lit(name).alias("model"))
            for name, risk in risks.items()
        ]
        paths.append(out_dir / "prs_deciles.csv")
        rates = ("observed_rate", "ci_low", "ci_high")
        public_table(pl.concat(deciles), ("model",), rates).write_csv(paths[1])
    return paths


def metric_key(model: str, metric: str) -> str:
    """An MLflow-safe metric name such as `counts_lr/auroc`."""
    return re.sub(r"[^\w\-./ ]", "_", f"{model}/{metric}")


def log_to_mlflow(results: list[ModelResult], artifacts: list[Path] = (), artifact_dir: str = "evaluation") -> bool:
    """Log every metric and artifact to the active MLflow run; False (nothing logged) without one.
    Person counts the small-count rule hides are left out (a metric is a number)."""
    import mlflow

    if mlflow.active_run() is None:
        return False
    metrics = {
        metric_key(r.name, k): v
        for r in results
        for k, v in public_json(r.metrics()).items()
        if not isinstance(v, str) and np.isfinite(v)
    }
    mlflow.log_metrics(metrics)
    for path in artifacts:
        mlflow.log_artifact(str(path), artifact_path=artifact_dir)
    return True
