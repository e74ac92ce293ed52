"""Disease onsets and death from age- and state-dependent hazards.

Each hazard is log-linear in age, sex, one genetic liability, BMI, smoking and the true status
of earlier-simulated diseases (`HazardCoefs`). T2D has two stages: normoglycaemia ->
prediabetes -> T2D, so HbA1c rises before onset and the stage carries risk. Onsets are drawn
by inverting the cumulative hazard on the quarter grid (exact for piecewise-constant hazards).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ehrfm_synthetic.params import TRAITS, GenerativeParams, HazardCoefs
from ehrfm_synthetic.population import ADULT_AGE, Population, bmi_at, smoking_state
from ehrfm_synthetic.time import DAYS_PER_YEAR, N_STEPS, SIM_END, STEP_DAYS, STEP_END, STEP_MID, STEP_START

# simulation order: a hazard may use the status of diseases earlier in this tuple only
DISEASES = ("hypertension", "prediabetes", "t2d", "cad", "stroke", "copd")
GENETIC_TRAIT = {
    "hypertension": "hypertension",
    "prediabetes": "t2d",
    "t2d": "t2d",
    "cad": "cad",
    "stroke": "stroke",
    "copd": "copd",
}
COMORBIDITIES = ("hypertension", "t2d", "cad", "stroke", "copd")
_SMOKING_TERMS = ("current_smoker", "former_smoker", "years_smoked")


@dataclass
class HazardInputs:
    """What the hazards depend on, per person (from a `Population` or from the truth files)."""

    birth: np.ndarray
    male: np.ndarray
    liability: np.ndarray  # [n, len(TRAITS)]
    group_mean: np.ndarray  # [n, len(TRAITS)]
    bmi18: np.ndarray
    bmi_slope: np.ndarray
    smoke_start_age: np.ndarray
    smoke_quit_age: np.ndarray
    onsets: dict[str, np.ndarray]  # disease -> onset day (inf = none)

    @classmethod
    def from_population(cls, pop: Population) -> HazardInputs:
        return cls(
            birth=pop.birth,
            male=pop.male,
            liability=pop.liability,
            group_mean=pop.group_mean,
            bmi18=pop.bmi18,
            bmi_slope=pop.bmi_slope,
            smoke_start_age=pop.smoke_start_age,
            smoke_quit_age=pop.smoke_quit_age,
            onsets={},
        )


def log_hazard(
    coefs: HazardCoefs, inputs: HazardInputs, rows: np.ndarray, times: np.ndarray, genetic: np.ndarray
) -> np.ndarray:
    """log hazard per year for persons `rows` at `times` (grid-step midpoints, [len(rows), M] or [1, M])."""
    age = (times - inputs.birth[rows, None]) / DAYS_PER_YEAR
    lp = coefs.base + coefs.age * (age - coefs.ref_age)
    lp = lp + coefs.male * inputs.male[rows, None] + coefs.genetic * genetic[:, None]
    if coefs.bmi:
        bmi = bmi_at(age, inputs.bmi18[rows, None], inputs.bmi_slope[rows, None])
        lp = lp + coefs.bmi * (bmi - 27.0)
    if any(getattr(coefs, term) for term in _SMOKING_TERMS):
        current, former, years = smoking_state(
            age, inputs.smoke_start_age[rows, None], inputs.smoke_quit_age[rows, None]
        )
        lp = lp + coefs.current_smoker * current + coefs.former_smoker * former + coefs.years_smoked * years
    for disease in COMORBIDITIES:
        weight = getattr(coefs, disease)
        if weight:
            if disease not in inputs.onsets:
                raise ValueError(f"hazard uses {disease!r} before it is simulated (order: {DISEASES})")
            lp = lp + weight * (inputs.onsets[disease][rows, None] <= times)
    return np.where(age >= ADULT_AGE, lp, -np.inf)


def sample_onset(log_h: np.ndarray, start: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """First event time of a piecewise-constant hazard on the grid, from `start` (inf = none by cut-off)."""
    n = len(start)
    lower = np.maximum(STEP_START[None, :], start[:, None])
    upper = np.minimum(STEP_END, SIM_END)[None, :]
    exposure = np.clip(upper - lower, 0.0, STEP_DAYS) / DAYS_PER_YEAR
    rate = np.exp(log_h)
    cum = np.cumsum(rate * exposure, axis=1)
    draw = rng.exponential(size=n)
    crossed = cum[:, -1] >= draw
    step = np.minimum(np.sum(cum < draw[:, None], axis=1), N_STEPS - 1)
    rows = np.arange(n)
    before = np.where(step > 0, cum[rows, step - 1], 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        within = (draw - before) / rate[rows, step] * DAYS_PER_YEAR
    onset = lower[rows, step] + within
    return np.where(crossed, np.minimum(onset, SIM_END - 1e-6), np.inf)


def genetic_value(inputs: HazardInputs, rows: np.ndarray, trait: str, use_genetics: bool = True) -> np.ndarray:
    column = TRAITS.index(trait)
    source = inputs.liability if use_genetics else inputs.group_mean
    return source[rows, column]


def obesity_onset(pop: Population) -> np.ndarray:
    """The day the BMI trajectory first reaches 30 (inf if never)."""
    already = pop.bmi18 >= 30.0
    with np.errstate(divide="ignore", invalid="ignore"):
        age = ADULT_AGE + (30.0 - pop.bmi18) / pop.bmi_slope
    reaches = (pop.bmi_slope > 0) & (age <= ADULT_AGE + 40.0)
    age = np.where(already, ADULT_AGE, np.where(reaches, age, np.inf))
    day = pop.birth + age * DAYS_PER_YEAR
    return np.where(day < SIM_END, day, np.inf)


@dataclass
class DiseaseHistory:
    onsets: dict[str, np.ndarray]  # disease (+ "obesity") -> true onset day, inf = none
    death: np.ndarray  # true death day, inf = alive at the cut-off
    cad_acute: np.ndarray  # bool: the CAD onset was a myocardial infarction


def simulate_diseases(pop: Population, params: GenerativeParams, rng: np.random.Generator) -> DiseaseHistory:
    inputs = HazardInputs.from_population(pop)
    rows = np.arange(len(pop))
    times = STEP_MID[None, :]
    adult = pop.birth + ADULT_AGE * DAYS_PER_YEAR
    for disease in DISEASES:
        genetic = genetic_value(inputs, rows, GENETIC_TRAIT[disease])
        log_h = log_hazard(params.hazards[disease], inputs, rows, times, genetic)
        start = inputs.onsets["prediabetes"] if disease == "t2d" else adult
        inputs.onsets[disease] = sample_onset(log_h, np.where(np.isfinite(start), start, SIM_END), rng)
    log_h = log_hazard(params.hazards["death"], inputs, rows, times, np.zeros(len(pop)))
    death = sample_onset(log_h, pop.obs_start, rng)
    onsets = {name: np.where(day <= death, day, np.inf) for name, day in inputs.onsets.items()}
    onsets["obesity"] = np.where(obesity_onset(pop) <= death, obesity_onset(pop), np.inf)
    cad_acute = rng.random(len(pop)) < params.coding.cad_acute_fraction
    return DiseaseHistory(onsets=onsets, death=death, cad_acute=cad_acute)
