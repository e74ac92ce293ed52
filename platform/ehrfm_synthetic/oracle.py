"""The oracle: the true probability of T2D onset within a horizon, from the generative truth.

It integrates the same piecewise-constant hazards that drew the onsets (`disease`),
over both T2D stages, conditioning on everything the truth holds except the T2D process
itself (so the realised hypertension path and death date are used). With
`use_genetics=False` the T2D liability is replaced by its ancestry-group mean: the gap between
the two AUROCs is the headroom a model reading PRS could gain.
"""

from __future__ import annotations

import numpy as np

from ehrfm_synthetic.disease import HazardInputs, genetic_value, log_hazard
from ehrfm_synthetic.params import GenerativeParams
from ehrfm_synthetic.time import DAYS_PER_YEAR, SIM_END, from_datetime64, step_midpoint


def t2d_onset_probability(
    inputs: HazardInputs,
    death: np.ndarray,
    params: GenerativeParams,
    rows: np.ndarray,
    start_day: np.ndarray,
    horizon_days: float,
    use_genetics: bool = True,
    substeps: int = 48,
) -> np.ndarray:
    """P(T2D onset in (start, start + horizon]) per query; NaN where T2D began at or before start."""
    rows = np.asarray(rows)
    t0 = np.asarray(start_day, dtype=np.float64)
    t_end = np.minimum(np.minimum(t0 + horizon_days, death[rows]), SIM_END)
    width = np.clip(t_end - t0, 0.0, None) / substeps
    times = t0[:, None] + (np.arange(substeps) + 0.5)[None, :] * width[:, None]
    mids = step_midpoint(times)
    genetic = genetic_value(inputs, rows, "t2d", use_genetics)
    years = (width / DAYS_PER_YEAR)[:, None]
    enter = np.exp(log_hazard(params.hazards["prediabetes"], inputs, rows, mids, genetic)) * years
    progress = np.exp(log_hazard(params.hazards["t2d"], inputs, rows, mids, genetic)) * years

    already_prediabetic = inputs.onsets["prediabetes"][rows] <= t0
    p_from_prediabetes = 1.0 - np.exp(-progress.sum(axis=1))
    survive_before = np.exp(-(np.cumsum(enter, axis=1) - enter))
    enter_in_step = survive_before * (1.0 - np.exp(-enter))
    progress_after = np.cumsum(progress[:, ::-1], axis=1)[:, ::-1] - progress / 2.0
    p_from_normal = np.sum(enter_in_step * (1.0 - np.exp(-progress_after)), axis=1)
    prob = np.where(already_prediabetic, p_from_prediabetes, p_from_normal)
    return np.where(inputs.onsets["t2d"][rows] <= t0, np.nan, prob)


def oracle_t2d_risk(
    truth,
    person_ids: np.ndarray,
    prediction_times: np.ndarray,
    horizon_days: int = 730,
    use_genetics: bool = True,
) -> np.ndarray:
    """Oracle probability of T2D onset within `horizon_days` after each prediction time.

    `truth` is a `SyntheticTruth` (see `synthetic_truth.load_truth`); `prediction_times` are
    numpy datetime64 values (or float days since 1970-01-01). NaN where T2D had begun already.
    """
    rows = truth.rows_of(np.asarray(person_ids, dtype=np.int64))
    times = np.asarray(prediction_times)
    start = from_datetime64(times) if times.dtype.kind == "M" else times.astype(np.float64)
    return t2d_onset_probability(
        truth.inputs, truth.death, truth.params, rows, start, float(horizon_days), use_genetics
    )
