"""Stratified views of a model: observed risk by PRS decile and metrics per subgroup.

Tables hold group counts and rates only, never a person's row. Groups smaller than `min_count`
get counts but no metrics (too few to estimate, and small cells are a disclosure risk);
`public_table` applies the small-count rule (ehrfm.small_counts) before a table is written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from ehrfm.evaluate.calibration import expected_calibration_error
from ehrfm.metrics import auprc_ci, auroc_ci
from ehrfm.small_counts import partition_hidden, show, threshold

AGE_EDGES = (40, 50, 60, 70)
NO_PRS = "no PRS"


def wilson_interval(events: np.ndarray, n: np.ndarray, z: float = 1.959964) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a proportion (well-behaved at 0 and 1 events)."""
    events, n = np.asarray(events, dtype=np.float64), np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = events / n
        denom = 1 + z**2 / n
        centre = (p + z**2 / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return centre - half, centre + half


def prs_deciles(prs, n_groups: int = 10) -> np.ndarray:
    """Group 1..n_groups by PRS quantile among persons with a PRS; 0 where the PRS is missing (NaN)."""
    values = np.asarray(prs, dtype=np.float64).ravel()
    present = np.isfinite(values)
    groups = np.zeros(values.size, dtype=np.int64)
    if present.any():
        ranks = np.argsort(np.argsort(values[present], kind="stable"), kind="stable")
        groups[present] = ranks * n_groups // present.sum() + 1
    return groups


def risk_by_prs_decile(y_true, prs, y_prob=None, n_groups: int = 10) -> pl.DataFrame:
    """Observed event rate (Wilson 95% CI) and mean predicted risk per PRS decile (+ a no-PRS row)."""
    y = np.asarray(y_true).astype(np.float64).ravel()
    groups = prs_deciles(prs, n_groups)
    if groups.size != y.size:
        raise ValueError(f"labels ({y.size}) and PRS values ({groups.size}) differ in length")
    n = np.bincount(groups, minlength=n_groups + 1)
    events = np.bincount(groups, weights=y, minlength=n_groups + 1)
    low, high = wilson_interval(events, n)
    columns = {
        "group": [NO_PRS] + [f"D{g}" for g in range(1, n_groups + 1)],
        "n": n.astype(np.int64),
        "events": events.astype(np.int64),
        "observed_rate": np.divide(events, n, out=np.full(n.size, np.nan), where=n > 0),
        "ci_low": low,
        "ci_high": high,
    }
    if y_prob is not None:
        p = np.asarray(y_prob, dtype=np.float64).ravel()
        sums = np.bincount(groups, weights=p, minlength=n_groups + 1)
        columns["mean_predicted"] = np.divide(sums, n, out=np.full(n.size, np.nan), where=n > 0)
    table = pl.DataFrame(columns)
    deciles = table.slice(1)
    return deciles.vstack(table.slice(0, 1)) if n[0] > 0 else deciles


def age_bucket(age_years, edges: tuple[int, ...] = AGE_EDGES) -> np.ndarray:
    """Labels such as '<40', '40-49', ..., '70+' (NaN age -> 'unknown')."""
    age = np.asarray(age_years, dtype=np.float64).ravel()
    names = [f"<{edges[0]}"] + [f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])] + [f"{edges[-1]}+"]
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), age, side="right")
    labels = np.asarray(names, dtype=object)[np.minimum(index, len(names) - 1)]
    labels[~np.isfinite(age)] = "unknown"
    return labels


def subgroup_table(
    y_true,
    y_prob,
    groups: Mapping[str, np.ndarray],
    n_boot: int = 200,
    seed: int = 0,
    min_count: int | None = None,
    persons=None,
) -> pl.DataFrame:
    """One row per (attribute, level): n, events, prevalence, AUROC/AUPRC with CIs, ECE. Metrics
    only where n >= min_count (default: above the small-count threshold) and both classes occur.
    `persons` (subject id per row): the CIs resample persons, not rows."""
    min_count = threshold() + 1 if min_count is None else min_count
    y = np.asarray(y_true).astype(bool).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    rows = []
    for attribute, values in groups.items():
        values = np.asarray(values, dtype=object).ravel()
        if values.size != y.size:
            raise ValueError(f"subgroup {attribute!r} has {values.size} values for {y.size} persons")
        for level in sorted({str(v) for v in values}):
            mask = values.astype(str) == level
            n, events = int(mask.sum()), int(y[mask].sum())
            row = {
                "attribute": attribute,
                "level": level,
                "n": n,
                "events": events,
                "prevalence": events / n,
                "auroc": np.nan,
                "auroc_low": np.nan,
                "auroc_high": np.nan,
                "auprc": np.nan,
                "auprc_low": np.nan,
                "auprc_high": np.nan,
                "ece": np.nan,
            }
            if n >= min_count and 0 < events < n:
                who = None if persons is None else np.asarray(persons).ravel()[mask]
                roc = auroc_ci(y[mask], p[mask], n_boot, seed, groups=who)
                pr = auprc_ci(y[mask], p[mask], n_boot, seed, groups=who)
                row.update(
                    auroc=roc.value,
                    auroc_low=roc.lower,
                    auroc_high=roc.upper,
                    auprc=pr.value,
                    auprc_low=pr.lower,
                    auprc_high=pr.upper,
                    ece=expected_calibration_error(y[mask], p[mask]),
                )
            rows.append(row)
    return pl.DataFrame(rows)


def public_table(table: pl.DataFrame, partition: Sequence[str], rates: Sequence[str] = ()) -> pl.DataFrame:
    """`table` as published: `n` and `events` as strings under the small-count rule, each group of
    rows with equal `partition` values being one partition of the persons (its totals are shown
    elsewhere), and the `rates` columns (which give events back from n) null where events are hidden."""
    keys = list(zip(*(table[c].to_list() for c in partition))) if partition else [()] * table.height
    n, events = table["n"].to_list(), table["events"].to_list()
    hide_n, hide_e = [False] * table.height, [False] * table.height
    for key in dict.fromkeys(keys):
        rows = [i for i, k in enumerate(keys) if k == key]
        part_n, part_e = partition_hidden([n[i] for i in rows], [events[i] for i in rows])
        for i, hidden_n, hidden_e in zip(rows, part_n, part_e):
            hide_n[i], hide_e[i] = hidden_n, hidden_e
    hidden = pl.Series("hidden", hide_e)
    return table.with_columns(
        pl.Series("n", [show(v, hidden=h) for v, h in zip(n, hide_n)], dtype=pl.String),
        pl.Series("events", [show(v, hidden=h) for v, h in zip(events, hide_e)], dtype=pl.String),
        *(pl.when(hidden).then(None).otherwise(pl.col(c)).alias(c) for c in rates),
    )
