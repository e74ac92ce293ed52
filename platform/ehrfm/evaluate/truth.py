"""A synthetic cohort's generative truth as evaluation sees it: the one interface to the simulator.

Evaluation asks a cohort's truth (`<cohort>/truth/`, written by `ehrfm synthesize`) for two things:
- `ancestry()`: every person's id and ancestry group (for the subgroup tables);
- `t2d_risk(person_ids, prediction_times, horizon_days, use_genetics)`: the oracle's probability of
  T2D onset within the horizon after each prediction time (numpy datetime64 times), with the
  person's true genetic liability or (use_genetics=False) their ancestry group's mean; NaN where
  T2D had begun already; KeyError naming how many ids the truth lacks.
(`truth/pgs.parquet`, which PGS measures which trait, is a plain file read by `oracle.trait_pgs`.)

The oracle integrates the simulator's own hazards, so the simulator answers: the provider module
below implements `CohortTruth` and is imported only here, lazily, and only when a cohort is given.
Nothing else in ehrfm imports the simulator except the `synthesize` command.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

import numpy as np

TRUTH_PROVIDER = "ehrfm_synthetic.truth_api"  # implements `load(cohort_dir) -> CohortTruth`


class CohortTruth(Protocol):
    def ancestry(self) -> tuple[np.ndarray, np.ndarray]:
        """(person ids int64, ancestry group names) of every person in the truth."""
        ...

    def t2d_risk(
        self, person_ids: np.ndarray, prediction_times: np.ndarray, horizon_days: int, use_genetics: bool
    ) -> np.ndarray: ...


def load_truth(cohort_dir: str | Path) -> CohortTruth:
    """The truth of the synthetic cohort in `cohort_dir`; a clear error when it has none."""
    truth_dir = Path(cohort_dir) / "truth"
    if not truth_dir.is_dir():
        raise FileNotFoundError(f"{truth_dir}: no generative truth (only cohorts from `ehrfm synthesize` have one)")
    return importlib.import_module(TRUTH_PROVIDER).load(cohort_dir)
