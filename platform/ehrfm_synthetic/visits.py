"""Visits: an inhomogeneous Poisson process whose rate follows age, frailty and health state.

Besides the Poisson visits, every person has an enrolment visit on the first day of observation,
acute events (myocardial infarction, stroke) bring an inpatient stay on the onset day, and most
deaths happen at the end of an inpatient stay.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ehrfm_synthetic.disease import DiseaseHistory
from ehrfm_synthetic.params import VisitParams
from ehrfm_synthetic.population import Population
from ehrfm_synthetic.time import DAYS_PER_YEAR, SIM_END, STEP_DAYS, STEP_END, STEP_MID, STEP_START, US_PER_DAY

OUTPATIENT, EMERGENCY, INPATIENT = 0, 1, 2
ACUTE_NONE, ACUTE_MI, ACUTE_STROKE, ACUTE_DEATH = 0, 1, 2, 3
ACTIVE_DISEASES = ("hypertension", "t2d", "cad", "stroke", "copd", "obesity")
_US_PER_MIN = 60_000_000


@dataclass
class Visits:
    """All visits of a chunk, sorted by (person, start); arrays aligned by visit row."""

    person: np.ndarray  # int64 chunk-local person index
    start_day: np.ndarray  # int64 days since epoch
    end_day: np.ndarray
    start_us: np.ndarray  # int64 microseconds since epoch
    end_us: np.ndarray
    kind: np.ndarray  # int8 OUTPATIENT / EMERGENCY / INPATIENT
    acute: np.ndarray  # int8 ACUTE_*

    def __len__(self) -> int:
        return len(self.person)


@dataclass
class ObservationWindow:
    start: np.ndarray  # whole days, first day observed
    end: np.ndarray  # whole days, last day observed (inclusive)
    death_recorded: np.ndarray  # bool: death happened inside the window (written to `death`)


def observation_window(pop: Population, hist: DiseaseHistory) -> ObservationWindow:
    death_day = np.floor(hist.death)
    recorded = np.isfinite(hist.death) & (death_day <= pop.dropout)
    end = np.minimum(np.minimum(pop.dropout, SIM_END - 1), np.where(recorded, death_day, np.inf))
    return ObservationWindow(start=pop.obs_start, end=np.maximum(end, pop.obs_start), death_recorded=recorded)


def _active_count(hist: DiseaseHistory, person: np.ndarray, when: np.ndarray) -> np.ndarray:
    return sum((hist.onsets[d][person] <= when).astype(np.int64) for d in ACTIVE_DISEASES)


def simulate_visits(
    pop: Population, hist: DiseaseHistory, window: ObservationWindow, params: VisitParams, rng: np.random.Generator
) -> Visits:
    n = len(pop)
    rows = np.arange(n)
    lower = np.maximum(STEP_START[None, :], window.start[:, None])
    upper = np.minimum(STEP_END[None, :], window.end[:, None] + 1.0)
    exposure = np.clip(upper - lower, 0.0, STEP_DAYS)
    age = (STEP_MID[None, :] - pop.birth[:, None]) / DAYS_PER_YEAR
    active = sum((hist.onsets[d][:, None] <= STEP_MID[None, :]).astype(np.float64) for d in ACTIVE_DISEASES)
    rate = params.base_rate_per_year * pop.visit_frailty[:, None] * np.exp(params.age_slope * (age - 50.0))
    prediabetic = (hist.onsets["prediabetes"][:, None] <= STEP_MID[None, :]) & (
        hist.onsets["t2d"][:, None] > STEP_MID[None, :]
    )
    rate = rate * (1.0 + params.per_disease * active + params.prediabetes * prediabetic)
    counts = rng.poisson(rate * exposure / DAYS_PER_YEAR)
    cell_person, cell_step = np.nonzero(counts)
    reps = counts[cell_person, cell_step]
    person = np.repeat(cell_person, reps)
    step = np.repeat(cell_step, reps)
    begin, span = lower[person, step], exposure[person, step]
    day = np.floor(begin + rng.random(len(person)) * span)
    active_now = _active_count(hist, person, day)
    p_ip = params.p_inpatient + params.per_disease_acute * active_now
    p_er = params.p_emergency + params.per_disease_acute * active_now
    u = rng.random(len(person))
    kind = np.where(u < p_ip, INPATIENT, np.where(u < p_ip + p_er, EMERGENCY, OUTPATIENT)).astype(np.int8)
    acute = np.zeros(len(person), dtype=np.int8)

    extra_person, extra_day, extra_kind, extra_acute = [rows], [window.start], [OUTPATIENT], [ACUTE_NONE]
    in_window = lambda day_: (day_ >= window.start) & (day_ <= window.end)  # noqa: E731
    mi_day = np.floor(hist.onsets["cad"])
    mi = hist.cad_acute & np.isfinite(mi_day) & in_window(mi_day)
    stroke_day = np.floor(hist.onsets["stroke"])
    stroke = np.isfinite(stroke_day) & in_window(stroke_day)
    for mask, days, code in ((mi, mi_day, ACUTE_MI), (stroke, stroke_day, ACUTE_STROKE)):
        extra_person.append(rows[mask])
        extra_day.append(days[mask])
        extra_kind.append(INPATIENT)
        extra_acute.append(code)
    dies_in_hospital = window.death_recorded & (rng.random(n) < 0.6)
    stay = 1 + rng.poisson(3.0, n)
    death_admit = np.maximum(window.end - stay, window.start)
    extra_person.append(rows[dies_in_hospital])
    extra_day.append(death_admit[dies_in_hospital])
    extra_kind.append(INPATIENT)
    extra_acute.append(ACUTE_DEATH)

    sizes = [len(p) for p in extra_person]
    person = np.concatenate([person, *extra_person]).astype(np.int64)
    day = np.concatenate([day, *extra_day]).astype(np.int64)
    kind = np.concatenate([kind, *[np.full(s, k, np.int8) for s, k in zip(sizes, extra_kind)]])
    acute = np.concatenate([acute, *[np.full(s, a, np.int8) for s, a in zip(sizes, extra_acute)]])
    return _timed(person, day, kind, acute, window, rng)


def _timed(
    person: np.ndarray,
    day: np.ndarray,
    kind: np.ndarray,
    acute: np.ndarray,
    window: ObservationWindow,
    rng: np.random.Generator,
) -> Visits:
    """Times of day, lengths of stay and end times; then sort by person and start."""
    m = len(person)
    last = window.end[person].astype(np.int64)
    minute_op = rng.integers(8 * 60, 17 * 60, m)
    minute_any = rng.integers(0, 24 * 60, m)
    start_minute = np.where(kind == OUTPATIENT, minute_op, minute_any)
    start_us = day * US_PER_DAY + start_minute * _US_PER_MIN
    stay_days = np.where(acute > ACUTE_NONE, 2 + rng.poisson(3.5, m), 1 + rng.poisson(2.5, m))
    end_day_ip = np.where(acute == ACUTE_DEATH, last, np.minimum(day + stay_days, last))
    duration_min = np.where(kind == OUTPATIENT, rng.integers(15, 61, m), rng.integers(120, 481, m))
    end_us = np.where(
        kind == INPATIENT,
        end_day_ip * US_PER_DAY + rng.integers(8 * 60, 16 * 60, m) * _US_PER_MIN,
        start_us + duration_min * _US_PER_MIN,
    )
    # at least five minutes long, never past the last observed day (starts are never after it)
    end_us = np.maximum(end_us, start_us + 5 * _US_PER_MIN)
    end_us = np.minimum(end_us, (last + 1) * US_PER_DAY - 1_000_000)
    order = np.lexsort((acute, kind, start_us, person))
    start_us, end_us = start_us[order], end_us[order]
    return Visits(
        person=person[order],
        start_day=start_us // US_PER_DAY,
        end_day=end_us // US_PER_DAY,
        start_us=start_us,
        end_us=end_us,
        kind=kind[order],
        acute=acute[order],
    )
