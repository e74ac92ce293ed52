"""Clinical events at visits: diagnoses, treatments, procedures, measurements, observations.

Each builder returns columns keyed by visit row; `omop` turns them into CDM rows.
The disease model drives the key codes (diagnoses and their treatments, HbA1c/glucose that
drift before T2D, BMI, blood pressure, lipids); a Zipf-distributed long tail over ~1,300 real
standard concepts fills in the rest, with a personal set of recurring background conditions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ehrfm_synthetic import concepts as cc
from ehrfm_synthetic.clinical import Diagnoses, VisitState, is_first_visit, visit_day_of
from ehrfm_synthetic.disease import DiseaseHistory
from ehrfm_synthetic.population import Population
from ehrfm_synthetic.visits import ACUTE_MI, ACUTE_STROKE

REFERENCE_RANGES = {
    cc.HBA1C: (4.0, 5.6), cc.GLUCOSE: (70.0, 99.0), cc.BMI: (18.5, 24.9), cc.SYSTOLIC: (90.0, 120.0),
    cc.DIASTOLIC: (60.0, 80.0), cc.HEART_RATE: (60.0, 100.0), cc.RESP_RATE: (12.0, 20.0),
    cc.LDL: (0.0, 100.0), cc.HDL: (40.0, 100.0), cc.CHOLESTEROL: (0.0, 200.0), cc.TRIGLYCERIDES: (0.0, 150.0),
    cc.CREATININE: (0.6, 1.3),
}  # fmt: skip
UNITS = {
    cc.HBA1C: cc.UNIT_PERCENT, cc.GLUCOSE: cc.UNIT_MG_DL, cc.BMI: cc.UNIT_KG_M2, cc.WEIGHT: cc.UNIT_KG,
    cc.HEIGHT: cc.UNIT_CM, cc.SYSTOLIC: cc.UNIT_MMHG, cc.DIASTOLIC: cc.UNIT_MMHG, cc.HEART_RATE: cc.UNIT_PER_MIN,
    cc.RESP_RATE: cc.UNIT_PER_MIN, cc.LDL: cc.UNIT_MG_DL, cc.HDL: cc.UNIT_MG_DL, cc.CHOLESTEROL: cc.UNIT_MG_DL,
    cc.TRIGLYCERIDES: cc.UNIT_MG_DL, cc.CREATININE: cc.UNIT_MG_DL,
}  # fmt: skip
BMP_PANEL = (3032503, 3018572, 3014094, 3000285, 3005456, 3004295)  # Ca, Cl, CO2, Na, K, BUN (Synthea values)
CBC_PANEL = (3000963, 3012030, 3020416, 3000905, 3024929, 3009744, 3023599, 3023314)
SMOKING_ANSWER_NAMES = {cc.NEVER_SMOKER: "Never smoker", cc.FORMER_SMOKER: "Former smoker",
                        cc.CURRENT_SMOKER: "Current every day smoker"}  # fmt: skip


@dataclass
class EventColumns:
    """Events of one CDM table: visit row, concept, and table-specific value columns."""

    parts: list[dict[str, np.ndarray]] = field(default_factory=list)

    def add(self, visit_rows: np.ndarray, concept: np.ndarray | int, **values: np.ndarray | float) -> None:
        visit_rows = np.asarray(visit_rows, dtype=np.int64)
        part = {"visit": visit_rows, "concept": np.broadcast_to(np.asarray(concept, np.int32), visit_rows.shape)}
        part.update({k: np.broadcast_to(np.asarray(v), visit_rows.shape) for k, v in values.items()})
        self.parts.append(part)

    def columns(self, defaults: dict[str, tuple[np.dtype, object]]) -> dict[str, np.ndarray]:
        """Concatenate parts; a column a part did not set takes the default fill value."""
        out: dict[str, np.ndarray] = {}
        for name, (dtype, fill) in {"visit": (np.int64, 0), "concept": (np.int32, 0), **defaults}.items():
            pieces = [np.asarray(p[name], dtype=dtype) if name in p else np.full(len(p["visit"]), fill, dtype=dtype)
                      for p in self.parts]  # fmt: skip
            out[name] = np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)
        return out


def _where(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask)


def _poisson_rows(rng: np.random.Generator, state: VisitState, rates: tuple[float, float, float]) -> np.ndarray:
    counts = rng.poisson(np.asarray(rates)[state.kind])  # rates per visit kind (OP, ER, IP)
    return np.repeat(np.arange(len(state)), counts)


def conditions(
    pop: Population,
    hist: DiseaseHistory,
    state: VisitState,
    dx: Diagnoses,
    pools: dict[str, cc.TailPool],
    rng: np.random.Generator,
) -> EventColumns:
    """Coded diseases (first diagnosis, repeats, spurious codes), complications, the background tail."""
    ev = EventColumns()
    codes = {"t2d": cc.T2D, "hypertension": cc.HYPERTENSION, "cad": cc.CAD, "stroke": cc.STROKE,
             "copd": cc.COPD, "obesity": cc.OBESITY}  # fmt: skip
    for disease, concept in codes.items():
        ev.add(_where(dx.coded[disease]), concept)
    ev.add(_where(state.acute == ACUTE_MI), cc.MYOCARDIAL_INFARCTION)
    long_diabetes = dx.after("t2d", state) & (state.years_since(hist.onsets["t2d"]) > 4.0)
    rows = _where(long_diabetes & (rng.random(len(state)) < 0.04))
    ev.add(rows, rng.choice(np.asarray(cc.T2D_COMPLICATIONS, np.int32), len(rows)))
    ev.add(_where(dx.coded["copd"] & (rng.random(len(state)) < 0.1)), cc.EMPHYSEMA)

    rows = _poisson_rows(rng, state, (0.35, 0.9, 1.5))
    personal = np.stack([pools["Condition"].draw(rng, pop.male) for _ in range(6)], axis=1)
    from_personal = rng.random(len(rows)) < 0.5
    fresh = pools["Condition"].draw(rng, state.male[rows])
    chosen = personal[state.person[rows], rng.integers(0, 6, len(rows))]
    ev.add(rows, np.where(from_personal, chosen, fresh))
    return ev


def drugs(
    pop: Population, state: VisitState, dx: Diagnoses, pools: dict[str, cc.TailPool], rng: np.random.Generator
) -> EventColumns:
    """Treatments from the diagnosis visit on (re-prescribed at later visits), plus short courses."""
    ev = EventColumns()
    n, m = len(pop), len(state)
    person = state.person
    refill = rng.random(m) < np.array([0.65, 0.2, 0.8])[state.kind]

    def prescribe(mask: np.ndarray, concept: np.ndarray | int, supply: int) -> None:
        rows = _where(mask)
        concept_rows = concept[person[rows]] if isinstance(concept, np.ndarray) else concept
        ev.add(rows, concept_rows, days_supply=supply, quantity=float(supply), refills=rng.integers(0, 4, len(rows)))

    is_dx = {d: np.arange(m) == dx.first_visit[d][person] for d in dx.first_visit}
    on = {d: dx.after(d, state) & (refill | is_dx[d]) for d in dx.first_visit}
    takes_metformin = rng.random(n) < 0.92
    prescribe(on["t2d"] & takes_metformin[person], cc.METFORMIN, 90)
    insulin_start = visit_day_of(dx.first_visit["t2d"], state) + rng.exponential(6.0, n) * 365.25
    insulin_kind = rng.choice(np.array([cc.INSULIN_LISPRO, cc.INSULIN_HUMULIN], np.int32), n)
    on_insulin = (rng.random(n) < 0.35)[person] & (state.day >= insulin_start[person]) & refill
    prescribe(on_insulin, insulin_kind, 30)

    bp1 = rng.choice(np.asarray(cc.BP_DRUGS, np.int32), n)
    bp2 = rng.choice(np.asarray(cc.BP_DRUGS, np.int32), n)
    second_bp = (rng.random(n) < 0.4) & (bp2 != bp1)
    prescribe(on["hypertension"], bp1, 90)
    prescribe(on["hypertension"] & second_bp[person], bp2, 90)

    statin = rng.choice(np.asarray(cc.STATINS, np.int32), n)
    diabetic_statin = (rng.random(n) < 0.5)[person] & on["t2d"] & (state.age >= 40)
    prescribe(on["cad"] | on["stroke"] | diabetic_statin, statin, 90)
    prescribe(on["cad"] & (rng.random(m) < 0.7), cc.ASPIRIN, 90)
    recent_mi = _recent(state, state.acute == ACUTE_MI, 365.0)
    prescribe(
        (recent_mi & refill) | (state.acute == ACUTE_MI) | (on["stroke"] & (rng.random(m) < 0.5)), cc.CLOPIDOGREL, 30
    )
    prescribe(on["stroke"] & (rng.random(n) < 0.15)[person], cc.WARFARIN, 30)
    prescribe(on["copd"], cc.COPD_DRUGS[0], 30)
    prescribe(on["copd"] & (rng.random(n) < 0.5)[person], cc.COPD_DRUGS[1], 30)

    rows = _poisson_rows(rng, state, (0.25, 0.6, 1.5))
    supply = rng.choice(np.array([5, 7, 10, 14, 30]), len(rows))
    ev.add(rows, pools["Drug"].draw(rng, state.male[rows]), days_supply=supply, quantity=supply.astype(float),
           refills=np.zeros(len(rows), np.int32))  # fmt: skip
    return ev


def _recent(state: VisitState, event: np.ndarray, days: float) -> np.ndarray:
    """Per visit: an earlier visit of the same person had `event` within the previous `days` days."""
    rows = np.arange(len(state))
    last = np.maximum.accumulate(np.where(event, rows, -1)) if len(rows) else rows
    earlier = np.where(event, np.concatenate([[-1], last[:-1]]) if len(rows) else last, last)
    found = earlier >= 0
    safe = np.where(found, earlier, 0)
    same = found & (state.person[safe] == state.person)
    return same & (state.day - state.day[safe] <= days)


def procedures(
    state: VisitState, dx: Diagnoses, pools: dict[str, cc.TailPool], rng: np.random.Generator
) -> EventColumns:
    """Work-up and treatment procedures of the modelled diseases, plus the long tail."""
    ev = EventColumns()
    m = len(state)
    u = lambda: rng.random(m)  # noqa: E731
    mi, stroke = state.acute == ACUTE_MI, state.acute == ACUTE_STROKE
    cad_seen, copd_seen = dx.coded["cad"], dx.coded["copd"]
    ev.add(_where((mi & (u() < 0.95)) | (cad_seen & (u() < 0.2)) | ((state.kind == 1) & (u() < 0.15))), cc.ECG)
    ev.add(_where(mi & (u() < 0.5)), cc.PCI)
    ev.add(_where(mi & (u() < 0.12)), cc.CABG)
    ev.add(_where((mi & (u() < 0.6)) | (cad_seen & (u() < 0.03))), cc.ECHO)
    ev.add(_where((stroke & (u() < 0.95)) | ((state.kind == 1) & (u() < 0.03))), cc.CT_HEAD)
    ev.add(_where(copd_seen & (state.kind != 0) & (u() < 0.5)), cc.NEBULIZER)
    t2d_dx = np.arange(m) == dx.first_visit["t2d"][state.person]
    ev.add(_where((t2d_dx & (u() < 0.5)) | (dx.coded["t2d"] & (u() < 0.05))), cc.DIABETES_CARE_PLAN)
    rows = _poisson_rows(rng, state, (0.35, 0.8, 2.0))
    ev.add(rows, pools["Procedure"].draw(rng, state.male[rows]))
    return ev


def observations(state: VisitState, pools: dict[str, cc.TailPool], rng: np.random.Generator) -> EventColumns:
    """Smoking status (first visit, then now and then) and long-tail observations."""
    ev = EventColumns()
    m = len(state)
    asked = is_first_visit(state.person) | ((state.kind == 0) & (rng.random(m) < 0.15))
    answer = np.where(state.current_smoker, cc.CURRENT_SMOKER,
                      np.where(state.former_smoker, cc.FORMER_SMOKER, cc.NEVER_SMOKER)).astype(np.int32)  # fmt: skip
    rows = _where(asked)
    ev.add(rows, cc.SMOKING_STATUS, value_as_concept_id=answer[rows])
    rows = _poisson_rows(rng, state, (0.2, 0.3, 0.6))
    ev.add(rows, pools["Observation"].draw(rng, state.male[rows]))
    return ev
