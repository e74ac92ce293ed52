"""The model card logged with every registered risk model: what it predicts, from what data, how
well (with CIs, overall and per subgroup), and what it must not be used for.

Aggregates only. Counts between 1 and `min_cell - 1` are shown as `<min_cell` (small cells are a
disclosure risk), and subgroups that small get no metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ehrfm.evaluate.report import ModelResult, markdown_table
from ehrfm.metrics import Estimate
from ehrfm.model.risk import HeadSpec

DEFAULT_MIN_CELL = 10
DEFAULT_INTENDED_USE = (
    "Research use: ranking adults by their risk of the outcome within the horizon, from their coded "
    "health record and, when available, polygenic risk scores, to study risk stratification and the "
    "added value of genetics. Scores are calibrated to the validation population of the training "
    "cohort; percentiles are relative to that population."
)
DEFAULT_LIMITS = (
    "Not a diagnostic device and not validated for clinical decisions about individuals.",
    "Calibration and percentiles hold for a population like the training cohort; recalibrate before "
    "use in another health system, country or time period.",
    "PRS inputs must be z-scores from the same scoring files and ancestry adjustment as training; "
    "performance in ancestry groups under-represented in training is uncertain (see the subgroup table).",
    "Codes absent from the training vocabulary are read as unknown (counted per person); a record coded "
    "with other vocabularies or conventions loses information silently otherwise.",
    "Only the last `context` tokens before the prediction time are read; older history is truncated "
    "(counted per person).",
)


def small_cell(count: Any, min_cell: int) -> str:
    """A count for publication: `<min_cell` for 1..min_cell-1, the number otherwise."""
    if isinstance(count, float) and not count.is_integer():
        return f"{count:.4g}"
    value = int(count)
    return f"<{min_cell}" if 0 < value < min_cell else str(value)


def _interval(row: Mapping[str, Any], metric: str) -> str:
    value = row.get(metric, math.nan)
    return Estimate(
        float(value), float(row.get(f"{metric}_low", math.nan)), float(row.get(f"{metric}_high", math.nan))
    ).fmt()


def subgroup_markdown(rows: Sequence[Mapping[str, Any]], min_cell: int = DEFAULT_MIN_CELL) -> str:
    """| attribute | level | n | events | AUROC [95% CI] | AUPRC [95% CI] | ECE | from subgroup_table rows."""
    lines = [
        "| attribute | level | n | events | AUROC [95% CI] | AUPRC [95% CI] | ECE |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        small = int(row["n"]) < min_cell or 0 < int(row["events"]) < min_cell
        ece = float(row.get("ece", math.nan))
        metrics = (
            ["n/a"] * 3
            if small
            else [_interval(row, "auroc"), _interval(row, "auprc"), "n/a" if math.isnan(ece) else f"{ece:.3f}"]
        )
        lines.append(
            f"| {row['attribute']} | {row['level']} | {small_cell(row['n'], min_cell)} | "
            f"{small_cell(row['events'], min_cell)} | " + " | ".join(metrics) + " |"
        )
    return "\n".join(lines) + "\n"


def model_card(
    spec: HeadSpec,
    data_summary: Mapping[str, int | float],
    results: Sequence[ModelResult],
    subgroups: Sequence[Mapping[str, Any]] | None = None,
    *,
    intended_use: str = DEFAULT_INTENDED_USE,
    limits: Sequence[str] = DEFAULT_LIMITS,
    min_cell: int = DEFAULT_MIN_CELL,
) -> str:
    """Markdown model card. `results` from evaluate.report.evaluate_predictions, `subgroups` the rows
    of evaluate.stratify.subgroup_table (`.to_dicts()`), `data_summary` cohort counts by name."""
    if hasattr(subgroups, "to_dicts"):
        subgroups = subgroups.to_dicts()
    calibration = (
        f"Platt scaling fit on validation (a={spec.platt[0]:.4g}, b={spec.platt[1]:.4g})"
        if spec.platt is not None
        else "none (raw sigmoid of the logit)"
    )
    parts = [
        f"# Model card: ehrfm-{spec.task}",
        "",
        "## Model",
        f"- Predicts: {spec.task} within {spec.horizon_days} days after the prediction time",
        f"- Input: the last {spec.context} tokens of the coded record up to the prediction time; "
        f"head on `{spec.head_inputs}`",
        f"- Polygenic scores: {len(spec.pgs_ids)} PGS ids" if spec.pgs_ids else "- Polygenic scores: not used",
        f"- Tokenizer: {spec.tokenizer_version or 'unversioned'}",
        f"- Calibration: {calibration}",
        "",
        "## Data",
        "| item | count |",
        "|---|---|",
        *(f"| {key} | {small_cell(value, min_cell)} |" for key, value in data_summary.items()),
        "",
        "## Metrics (95% bootstrap CIs)",
        markdown_table(list(results)),
        "## Subgroups",
        subgroup_markdown(subgroups, min_cell) if subgroups else "No subgroup table was given.\n",
        "## Intended use",
        intended_use,
        "",
        "## Limits",
        *(f"- {item}" for item in limits),
        "",
    ]
    return "\n".join(parts)
