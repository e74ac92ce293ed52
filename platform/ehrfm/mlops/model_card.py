"""The model card logged with every registered risk model: what it predicts, from what data, how
well (with CIs, overall and per subgroup), and what it must not be used for.

Aggregates only. Person counts follow the small-count rule (ehrfm.small_counts: 1..20 shown as
`<=20`, with complementary suppression), and subgroups that small get no metrics. Values given as
strings (counts already suppressed, or counts of things rather than people) are shown as given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ehrfm.evaluate.report import ModelResult, markdown_table
from ehrfm.metrics import Estimate
from ehrfm.model.risk import HeadSpec
from ehrfm.small_counts import binary_hidden, is_small, partition_hidden, show

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


def summary_cell(value: Any) -> str:
    """A data-summary value: strings as given, fractions as numbers, person counts by the rule."""
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    return show(value)


def _interval(row: Mapping[str, Any], metric: str) -> str:
    value = row.get(metric, math.nan)
    return Estimate(
        float(value), float(row.get(f"{metric}_low", math.nan)), float(row.get(f"{metric}_high", math.nan))
    ).fmt()


def subgroup_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """| attribute | level | n | events | AUROC [95% CI] | AUPRC [95% CI] | ECE | from subgroup_table
    rows; each attribute's levels are one partition of the persons (complementary suppression)."""
    lines = [
        "| attribute | level | n | events | AUROC [95% CI] | AUPRC [95% CI] | ECE |",
        "|---|---|---|---|---|---|---|",
    ]
    hidden: dict[int, tuple[bool, bool]] = {}
    for attribute in dict.fromkeys(row["attribute"] for row in rows):
        index = [i for i, row in enumerate(rows) if row["attribute"] == attribute]
        hide_n, hide_e = partition_hidden([rows[i]["n"] for i in index], [rows[i]["events"] for i in index])
        hidden |= dict(zip(index, zip(hide_n, hide_e)))
    for i, row in enumerate(rows):
        small = is_small(row["n"]) or binary_hidden(row["n"], row["events"])[1]
        ece = float(row.get("ece", math.nan))
        metrics = (
            ["n/a"] * 3
            if small
            else [_interval(row, "auroc"), _interval(row, "auprc"), "n/a" if math.isnan(ece) else f"{ece:.3f}"]
        )
        lines.append(
            f"| {row['attribute']} | {row['level']} | {show(row['n'], hidden=hidden[i][0])} | "
            f"{show(row['events'], hidden=hidden[i][1])} | " + " | ".join(metrics) + " |"
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
) -> str:
    """Markdown model card. `results` from evaluate.report.evaluate_predictions, `subgroups` the rows
    of evaluate.stratify.subgroup_table (`.to_dicts()`), `data_summary` cohort counts by name (a
    value that is not a person count, e.g. a number of PGS ids, is passed as a string)."""
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
        (
            f"- Lab values: the head also reads the latest value bin of {len(spec.value_codes)} lab codes in the "
            f"window (within {', '.join(f'{d} days' for d in spec.value_recency_days)} and anywhere; "
            f"{spec.value_encoding.replace('_', '-')} columns)"
            if spec.value_codes
            else "- Lab values: through the decoder's states only"
        ),
        f"- Tokenizer: {spec.tokenizer_version or 'unversioned'}",
        f"- Calibration: {calibration}",
        "",
        "## Data",
        "| item | count |",
        "|---|---|",
        *(f"| {key} | {summary_cell(value)} |" for key, value in data_summary.items()),
        "",
        "## Metrics (95% bootstrap CIs)",
        markdown_table(list(results)),
        "## Subgroups",
        subgroup_markdown(subgroups) if subgroups else "No subgroup table was given.\n",
        "## Intended use",
        intended_use,
        "",
        "## Limits",
        *(f"- {item}" for item in limits),
        "",
    ]
    return "\n".join(parts)
