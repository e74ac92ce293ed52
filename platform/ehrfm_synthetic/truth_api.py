"""The simulator's side of `ehrfm.evaluate.truth.CohortTruth`: what evaluation may ask a truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ehrfm_synthetic.oracle import oracle_t2d_risk
from ehrfm_synthetic.truth import SyntheticTruth, load_truth


class SimulatorTruth:
    """A loaded `SyntheticTruth` behind the two questions evaluation asks."""

    def __init__(self, truth: SyntheticTruth):
        self._truth = truth

    def ancestry(self) -> tuple[np.ndarray, np.ndarray]:
        ancestry = self._truth.table["ancestry"].to_numpy(zero_copy_only=False).astype(str)
        return self._truth.person_id.astype(np.int64), ancestry

    def t2d_risk(
        self, person_ids: np.ndarray, prediction_times: np.ndarray, horizon_days: int, use_genetics: bool
    ) -> np.ndarray:
        return oracle_t2d_risk(self._truth, person_ids, prediction_times, horizon_days, use_genetics=use_genetics)


def load(cohort_dir: str | Path) -> SimulatorTruth:
    return SimulatorTruth(load_truth(cohort_dir))
