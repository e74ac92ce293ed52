"""What the synthetic cohort's generative truth says about the label rows: oracle risks and ancestry.

The oracle is the true probability of T2D onset within the horizon (`truth.CohortTruth`), once with
each person's true genetic liability and once with only their ancestry group's mean liability.
Their AUROC gap on the label rows is the most any model could gain from genetics on this task.
Coded labels lag the true onset: a label row whose T2D has already begun (but is not coded yet)
gets oracle risk 1 under both oracles, since the truth knows the disease is there; their count is
reported. Only synthetic cohorts have a truth; it is never read by the models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from ehrfm.evaluate.truth import CohortTruth

ORACLE_GENETIC = "oracle_genetic"
ORACLE_GROUP_MEAN = "oracle_group_mean"
TRUTH_TRAIT = "t2d"


@dataclass(frozen=True)
class OracleScores:
    """Oracle risks over the given label rows, and which rows had T2D begun already."""

    risks: dict[str, np.ndarray]
    already_begun: np.ndarray  # bool per label row
    horizon_days: int


def oracle_scores(truth: CohortTruth, labels: pa.Table, horizon_days: int, source: str = "truth") -> OracleScores:
    """Both oracles' T2D risks for every row of `labels` (subject_id = the cohort's person_id)."""
    persons = labels["subject_id"].to_numpy(zero_copy_only=False).astype(np.int64)
    times = labels["prediction_time"].cast(pa.timestamp("us")).to_numpy(zero_copy_only=False)
    try:
        genetic = truth.t2d_risk(persons, times, horizon_days, use_genetics=True)
        group_mean = truth.t2d_risk(persons, times, horizon_days, use_genetics=False)
    except KeyError as err:
        raise ValueError(f"{source}: label subjects missing from the truth: {err.args[0]}") from None
    begun = np.isnan(genetic)
    genetic[begun], group_mean[begun] = 1.0, 1.0
    return OracleScores({ORACLE_GENETIC: genetic, ORACLE_GROUP_MEAN: group_mean}, begun, horizon_days)


def truth_ancestry(truth: CohortTruth) -> pl.DataFrame:
    """(subject_id, ancestry) of every person in the truth."""
    person_ids, ancestry = truth.ancestry()
    return pl.DataFrame({"subject_id": person_ids, "ancestry": ancestry})


def trait_pgs(cohort_dir: Path, trait: str = TRUTH_TRAIT) -> str | None:
    """The PGS id that measures `trait` most accurately according to the truth, if any does."""
    path = Path(cohort_dir) / "truth" / "pgs.parquet"
    if not path.exists():
        return None
    table = pl.read_parquet(path, columns=["pgs_id", "trait", "accuracy_reference"]).filter(pl.col("trait") == trait)
    if table.is_empty():
        return None
    return table.sort("accuracy_reference", descending=True)["pgs_id"][0]


def pgs_column(prs_dir: Path, pgs_id: str | None) -> int:
    """Column of `pgs_id` in the prs/ vectors (from prs/pgs_ids.json); column 0 when no id is asked for."""
    if pgs_id is None:
        return 0
    ids_path = Path(prs_dir) / "pgs_ids.json"
    if not ids_path.exists():
        raise FileNotFoundError(f"{ids_path}: needed to find PGS {pgs_id}")
    ids = json.loads(ids_path.read_text())
    if pgs_id not in ids:
        raise ValueError(f"{ids_path}: PGS {pgs_id} is not among its {len(ids)} ids")
    return ids.index(pgs_id)
