"""Measurements with values and units: vitals, HbA1c/glucose, lipids, panels and a long tail.

Values follow the clinical state: HbA1c and glucose climb through prediabetes before T2D onset
and fall on treatment, blood pressure rises with hypertension and falls when treated, LDL
falls on statins. Panel and long-tail values use distributions measured in Synthea27Nj.
"""

from __future__ import annotations

import numpy as np

from ehrfm_synthetic import concepts as cc
from ehrfm_synthetic.clinical import Diagnoses, VisitState
from ehrfm_synthetic.events import BMP_PANEL, CBC_PANEL, REFERENCE_RANGES, UNITS, EventColumns, _poisson_rows
from ehrfm_synthetic.population import Population


def _add_value(ev: EventColumns, rows: np.ndarray, concept: int, values: np.ndarray, decimals: int) -> None:
    """Rows of one key concept; `values` is per visit."""
    low, high = REFERENCE_RANGES.get(concept, (np.nan, np.nan))
    ev.add(rows, concept, value=np.round(values[rows], decimals), unit=UNITS.get(concept, 0), range_low=low,
           range_high=high)  # fmt: skip


def _spec_values(rng: np.random.Generator, concepts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(value, unit) drawn from the Synthea-derived distribution of each concept; NaN/0 if none."""
    specs = cc.measurement_specs()
    pos = np.clip(np.searchsorted(specs.concept_id, concepts), 0, len(specs.concept_id) - 1)
    known = specs.concept_id[pos] == concepts
    raw = specs.mean[pos] + specs.sd[pos] * rng.standard_normal(len(concepts))
    value = np.round(np.clip(raw, specs.low[pos], specs.high[pos]), 1)
    return np.where(known, value, np.nan), np.where(known, specs.unit_concept_id[pos], 0).astype(np.int32)


def measurements(
    pop: Population, state: VisitState, dx: Diagnoses, pools: dict[str, cc.TailPool], rng: np.random.Generator
) -> EventColumns:
    ev = EventColumns()
    m, p = len(state), state.person
    rows_all = np.arange(m)
    u = lambda: rng.random(m)  # noqa: E731

    vit = np.flatnonzero(dx.vitals)
    _add_value(ev, vit, cc.BMI, dx.bmi_measured, 1)
    height = pop.height_cm[p] + rng.normal(0.0, 0.5, m)
    weight = dx.bmi_measured * (height / 100.0) ** 2
    _add_value(ev, vit, cc.WEIGHT, weight, 1)
    _add_value(ev, np.flatnonzero(dx.vitals & (u() < 0.3)), cc.HEIGHT, height, 1)
    htn_treated = dx.after("hypertension", state)
    sbp = (112.0 + 0.45 * (state.age - 30.0) + 0.7 * (state.bmi - 27.0) + pop.sbp_offset[p]
           + 14.0 * state.has["hypertension"] - 12.0 * htn_treated + rng.normal(0.0, 6.0, m))  # fmt: skip
    dbp = 0.45 * sbp + 20.0 + rng.normal(0.0, 5.0, m)
    _add_value(ev, vit, cc.SYSTOLIC, sbp, 0)
    _add_value(ev, vit, cc.DIASTOLIC, dbp, 0)
    _add_value(ev, vit, cc.HEART_RATE, 72.0 + 4.0 * state.has["copd"] + rng.normal(0.0, 10.0, m), 0)
    _add_value(ev, np.flatnonzero(dx.vitals & (u() < 0.5)), cc.RESP_RATE, 16.0 + rng.normal(0.0, 1.5, m), 0)

    hba1c = dx.hba1c_latent + rng.normal(0.0, 0.12, m)
    _add_value(ev, np.flatnonzero(dx.hba1c_measured), cc.HBA1C, hba1c, 1)
    bmp = u() < np.array([0.08, 0.6, 0.95])[state.kind]
    glucose = 30.0 * dx.hba1c_latent - 72.0 + rng.normal(0.0, 10.0, m)
    _add_value(ev, np.flatnonzero(bmp | (dx.hba1c_measured & (u() < 0.6))), cc.GLUCOSE, glucose, 0)
    creatinine = 0.75 + 0.2 * state.male + 0.005 * (state.age - 40.0) + rng.normal(0.0, 0.12, m)
    _add_value(ev, np.flatnonzero(bmp), cc.CREATININE, np.clip(creatinine, 0.4, None), 2)
    for panel, mask in ((BMP_PANEL, bmp), (CBC_PANEL, u() < np.array([0.05, 0.5, 0.9])[state.kind])):
        rows = np.flatnonzero(mask)
        for concept in panel:
            value, unit = _spec_values(rng, np.full(len(rows), concept, np.int64))
            ev.add(rows, concept, value=value, unit=unit, range_low=np.nan, range_high=np.nan)

    known_risk = dx.after("t2d", state) | dx.after("cad", state)
    lipids = np.flatnonzero(u() < np.where(known_risk, 0.25, 0.08) * (state.kind == 0))
    on_statin = dx.after("cad", state) | dx.after("stroke", state) | (dx.after("t2d", state) & (state.age >= 40))
    ldl = np.clip(110.0 + 0.4 * (state.age - 40.0) + pop.ldl_offset[p] - 40.0 * on_statin, 30.0, None)
    hdl = np.clip(55.0 - 0.8 * (state.bmi - 27.0) - 8.0 * state.male + rng.normal(0.0, 8.0, m), 20.0, 110.0)
    tg = np.exp(np.log(120.0) + 0.03 * (state.bmi - 27.0) + rng.normal(0.0, 0.35, m)) + 30.0 * state.has["t2d"]
    for concept, values in (
        (cc.LDL, ldl),
        (cc.HDL, hdl),
        (cc.TRIGLYCERIDES, tg),
        (cc.CHOLESTEROL, ldl + hdl + tg / 5.0),
    ):
        _add_value(ev, lipids, concept, values, 0)

    copd_dx = rows_all == dx.first_visit["copd"][p]
    ev.add(np.flatnonzero((copd_dx & (u() < 0.6)) | (dx.coded["copd"] & (u() < 0.05))), cc.SPIROMETRY,
           value=np.nan, unit=0, range_low=np.nan, range_high=np.nan)  # fmt: skip
    rows = _poisson_rows(rng, state, (0.3, 1.0, 2.0))
    concepts = pools["Measurement"].draw(rng, state.male[rows])
    value, unit = _spec_values(rng, concepts.astype(np.int64))
    ev.add(rows, concepts, value=value, unit=unit, range_low=np.nan, range_high=np.nan)
    return ev
