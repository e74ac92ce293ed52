"""Clinical state at each visit, and how true disease becomes a diagnosis (noisy and late).

T2D is found either by an HbA1c >= 6.5 at a visit where HbA1c happens to be measured, or when
it becomes clinically apparent (onset + an exponential delay). Other chronic diseases are
diagnosed at the first visit after onset + delay; acute events at their inpatient stay; some
cases are never coded, and any visit may carry a spurious code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ehrfm_synthetic.disease import DiseaseHistory
from ehrfm_synthetic.params import CodingParams
from ehrfm_synthetic.population import Population, bmi_at, smoking_state
from ehrfm_synthetic.time import DAYS_PER_YEAR
from ehrfm_synthetic.visits import ACUTE_STROKE, Visits

CODED_DISEASES = ("t2d", "hypertension", "cad", "stroke", "copd", "obesity")
NO_VISIT = np.iinfo(np.int64).max


@dataclass
class VisitState:
    """Per-visit covariates (aligned with `Visits`)."""

    person: np.ndarray
    day: np.ndarray  # float days (visit start day)
    age: np.ndarray
    bmi: np.ndarray  # true BMI
    male: np.ndarray
    current_smoker: np.ndarray
    former_smoker: np.ndarray
    kind: np.ndarray
    acute: np.ndarray
    has: dict[str, np.ndarray]  # true status per disease at the visit

    def __len__(self) -> int:
        return len(self.person)

    def years_since(self, day_per_person: np.ndarray) -> np.ndarray:
        return (self.day - day_per_person[self.person]) / DAYS_PER_YEAR


def visit_state(pop: Population, hist: DiseaseHistory, visits: Visits) -> VisitState:
    p = visits.person
    day = visits.start_day.astype(np.float64)
    age = (day - pop.birth[p]) / DAYS_PER_YEAR
    current, former, _ = smoking_state(age, pop.smoke_start_age[p], pop.smoke_quit_age[p])
    has = {name: onset[p] <= day for name, onset in hist.onsets.items()}
    return VisitState(
        person=p,
        day=day,
        age=age,
        bmi=bmi_at(age, pop.bmi18[p], pop.bmi_slope[p]),
        male=pop.male[p],
        current_smoker=current,
        former_smoker=former,
        kind=visits.kind,
        acute=visits.acute,
        has=has,
    )


def first_visit_per_person(mask: np.ndarray, person: np.ndarray, n_persons: int) -> np.ndarray:
    """Row of the first visit with `mask` set, per person (NO_VISIT if none); visits are sorted."""
    rows = np.flatnonzero(mask)
    first = np.full(n_persons, NO_VISIT, dtype=np.int64)
    persons, at = np.unique(person[rows], return_index=True)
    first[persons] = rows[at]
    return first


def hba1c_untreated(pop: Population, hist: DiseaseHistory, state: VisitState) -> np.ndarray:
    """Latent HbA1c (%) without treatment: flat, then a prediabetic climb, then diabetic."""
    p = state.person
    offset = pop.a1c_offset[p]
    normal = np.clip(5.15 + 0.006 * (state.age - 40.0) + 0.015 * (state.bmi - 27.0) + offset, 4.3, 5.6)
    prediabetic = np.clip(5.7 + 0.2 * state.years_since(hist.onsets["prediabetes"]) + 0.5 * offset, 5.7, 6.3)
    diabetic = np.clip(6.6 + 0.3 * state.years_since(hist.onsets["t2d"]) + 1.5 * offset, 6.5, 11.5)
    return np.where(state.has["t2d"], diabetic, np.where(state.has["prediabetes"], prediabetic, normal))


@dataclass
class Diagnoses:
    first_visit: dict[str, np.ndarray]  # disease -> per person first coded visit row (NO_VISIT = never)
    coded: dict[str, np.ndarray]  # disease -> per visit: the disease's code is written at this visit
    hba1c_measured: np.ndarray  # per visit
    hba1c_latent: np.ndarray  # per visit, treatment applied after the T2D diagnosis
    vitals: np.ndarray  # per visit: vital signs were taken
    bmi_measured: np.ndarray  # per visit: observed BMI (NaN when no vitals)

    def after(self, disease: str, state: VisitState, inclusive: bool = True) -> np.ndarray:
        first = self.first_visit[disease][state.person]
        rows = np.arange(len(state))
        return rows >= first if inclusive else rows > first


def diagnose(
    pop: Population,
    hist: DiseaseHistory,
    visits: Visits,
    state: VisitState,
    coding: CodingParams,
    rng: np.random.Generator,
) -> Diagnoses:
    n, m = len(pop), len(visits)
    p, rows = state.person, np.arange(m)
    first: dict[str, np.ndarray] = {}
    for disease in ("hypertension", "cad", "stroke", "copd"):
        delay = rng.exponential(max(coding.diagnosis_delay_years.get(disease, 0.0), 1e-9), n) * DAYS_PER_YEAR
        if disease == "cad":
            delay = np.where(hist.cad_acute, 0.0, delay)
        missed = rng.random(n) < coding.never_coded.get(disease, 0.0)
        if disease == "cad":
            missed &= ~hist.cad_acute
        due = np.where(missed, np.inf, np.floor(hist.onsets[disease] + delay))
        first[disease] = first_visit_per_person(state.day >= due[p], p, n)

    vitals = rng.random(m) < np.array([0.6, 0.9, 1.0])[state.kind]
    bmi_measured = np.where(vitals, np.round(state.bmi + rng.normal(0.0, 0.5, m), 1), np.nan)
    obese_seen = vitals & (bmi_measured >= 30.0) & (rng.random(m) < 0.25)
    first["obesity"] = first_visit_per_person(obese_seen, p, n)

    untreated = hba1c_untreated(pop, hist, state)
    htn_known = rows >= first["hypertension"][p]
    p_screen = (
        0.05 + 0.05 * (state.age >= 45) + 0.06 * (state.bmi >= 30) + 0.05 * htn_known
        + np.array([0.0, 0.1, 0.3])[state.kind]
    )  # fmt: skip
    # once an HbA1c >= 5.7 has been seen, prediabetes is followed up with more frequent tests; the
    # same uniforms with a probability that only grows keep the first such visit unchanged
    draw = rng.random(m)
    screen_value = untreated + rng.normal(0.0, 0.12, m)
    seen_high = first_visit_per_person((draw < p_screen) & (screen_value >= 5.7), p, n)
    followed_up = rows > seen_high[p]
    screened = draw < p_screen + coding.prediabetes_followup * followed_up
    # a confirmatory test catches most false alarms from a single noisy value
    confirmed = rng.random(m) < np.where(untreated >= 6.5, coding.hba1c_diagnosis_prob, 0.1)
    lab_found = screened & (screen_value >= coding.hba1c_diagnosis_threshold) & confirmed
    apparent = np.floor(hist.onsets["t2d"] + rng.exponential(coding.diagnosis_delay_years["t2d"], n) * DAYS_PER_YEAR)
    missed = rng.random(n) < coding.never_coded["t2d"]
    candidate = (lab_found | (state.day >= apparent[p])) & ~missed[p]
    first["t2d"] = first_visit_per_person(candidate, p, n)

    after_t2d = rows >= first["t2d"][p]
    followed = rng.random(m) < np.array([0.6, 0.4, 0.9])[state.kind]
    measured = np.where(after_t2d, followed | (rows == first["t2d"][p]) & screened, screened)
    control = rng.normal(0.0, 0.6, n)
    years_treated = np.clip(state.years_since(visit_day_of(first["t2d"], state)), 0.0, None)
    treated = np.minimum(untreated, np.clip(6.9 + 0.08 * years_treated + control[p], 5.8, 11.0))
    latent = np.where(after_t2d & (rows > first["t2d"][p]), treated, untreated)

    coded = {}
    for disease in CODED_DISEASES:
        after = rows > first[disease][p]
        repeat = after & (rng.random(m) < np.asarray(coding.recode)[state.kind])
        spurious = rng.random(m) < coding.false_positive.get(disease, 0.0)
        coded[disease] = (rows == first[disease][p]) | repeat | spurious
    coded["stroke"] |= state.acute == ACUTE_STROKE
    return Diagnoses(
        first_visit=first,
        coded=coded,
        hba1c_measured=measured,
        hba1c_latent=latent,
        vitals=vitals,
        bmi_measured=bmi_measured,
    )


def visit_day_of(first_visit: np.ndarray, state: VisitState) -> np.ndarray:
    """Per person: the day of the given visit row (inf where NO_VISIT)."""
    has = first_visit != NO_VISIT
    out = np.full(len(first_visit), np.inf)
    out[has] = state.day[first_visit[has]]
    return out


def is_first_visit(person: np.ndarray) -> np.ndarray:
    out = np.ones(len(person), dtype=bool)
    out[1:] = person[1:] != person[:-1]
    return out
