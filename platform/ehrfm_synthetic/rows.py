"""Rows of each CDM table for one simulated chunk (persons, visits and their events)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ehrfm_synthetic import concepts as cc
from ehrfm_synthetic.disease import DiseaseHistory
from ehrfm_synthetic.events import SMOKING_ANSWER_NAMES, EventColumns
from ehrfm_synthetic.omop import build_table, source_values
from ehrfm_synthetic.population import Population
from ehrfm_synthetic.time import US_PER_DAY
from ehrfm_synthetic.visits import ObservationWindow, Visits

_US_PER_MIN = 60_000_000
VISIT_CONCEPTS = np.array([cc.OUTPATIENT, cc.EMERGENCY, cc.INPATIENT], dtype=np.int32)
_RACE_NAMES = {cc.RACE_WHITE: "white", cc.RACE_BLACK: "black", cc.RACE_ASIAN: "asian", 0: "unknown"}


def _names_of(codes: np.ndarray, names: dict[int, str]) -> pa.Array:
    """Vectorised code -> name lookup (null for codes not in `names`)."""
    keys = np.array(sorted(names), dtype=np.int64)
    table = pa.array([names[int(k)] for k in keys] + [None], pa.string())
    pos = np.clip(np.searchsorted(keys, codes), 0, len(keys) - 1)
    pos = np.where(keys[pos] == codes, pos, len(keys))
    return table.take(pa.array(pos))


def person_rows(pop: Population) -> pa.Table:
    birth = pop.birth.astype("int64").astype("datetime64[D]")
    years = birth.astype("datetime64[Y]")
    months = birth.astype("datetime64[M]")
    race_names = _names_of(pop.race_concept_id, _RACE_NAMES)
    return build_table(
        "person",
        {
            "person_id": pop.person_id,
            "gender_concept_id": np.where(pop.male, cc.MALE, cc.FEMALE),
            "year_of_birth": years.astype(np.int64) + 1970,
            "month_of_birth": (months - years).astype(np.int64) + 1,
            "day_of_birth": (birth - months).astype(np.int64) + 1,
            "birth_datetime": pop.birth.astype(np.int64) * US_PER_DAY,
            "race_concept_id": pop.race_concept_id,
            "ethnicity_concept_id": pop.ethnicity_concept_id,
            "person_source_value": pop.person_id.astype(str).astype(object),
            "gender_source_value": np.where(pop.male, "M", "F").astype(object),
            "gender_source_concept_id": np.zeros(len(pop), np.int32),
            "race_source_value": race_names,
            "race_source_concept_id": np.zeros(len(pop), np.int32),
            "ethnicity_source_value": np.where(
                pop.ethnicity_concept_id == cc.HISPANIC, "hispanic", "not hispanic"
            ).astype(object),
            "ethnicity_source_concept_id": np.zeros(len(pop), np.int32),
        },
    )


def observation_period_rows(pop: Population, window: ObservationWindow, id_base: int) -> pa.Table:
    n = len(pop)
    return build_table(
        "observation_period",
        {
            "observation_period_id": id_base + np.arange(n),
            "person_id": pop.person_id,
            "observation_period_start_date": window.start,
            "observation_period_end_date": window.end,
            "period_type_concept_id": np.full(n, cc.EHR_TYPE, np.int32),
        },
    )


def visit_ids(visits: Visits, id_base: int) -> np.ndarray:
    return id_base + np.arange(len(visits), dtype=np.int64)


def visit_rows(pop: Population, visits: Visits, id_base: int) -> pa.Table:
    ids = visit_ids(visits, id_base)
    concept = VISIT_CONCEPTS[visits.kind]
    preceding = np.full(len(visits), -1, np.int64)
    same_person = np.zeros(len(visits), bool)
    if len(visits) > 1:
        same_person[1:] = visits.person[1:] == visits.person[:-1]
        preceding[1:] = ids[:-1]
    return build_table(
        "visit_occurrence",
        {
            "visit_occurrence_id": ids,
            "person_id": pop.person_id[visits.person],
            "visit_concept_id": concept,
            "visit_start_date": visits.start_day,
            "visit_start_datetime": visits.start_us,
            "visit_end_date": visits.end_day,
            "visit_end_datetime": visits.end_us,
            "visit_type_concept_id": np.full(len(visits), cc.EHR_TYPE, np.int32),
            "visit_source_value": source_values(concept),
            "visit_source_concept_id": concept,
            "admitted_from_concept_id": np.zeros(len(visits), np.int32),
            "discharged_to_concept_id": np.zeros(len(visits), np.int32),
            "preceding_visit_occurrence_id": pa.array(preceding, mask=~same_person),
        },
    )


# per table: CDM column prefix, id column, date/datetime column names
_EVENT_LAYOUT = {
    "condition_occurrence": (
        "condition",
        "condition_occurrence_id",
        "condition_start_date",
        "condition_start_datetime",
    ),
    "drug_exposure": ("drug", "drug_exposure_id", "drug_exposure_start_date", "drug_exposure_start_datetime"),
    "procedure_occurrence": ("procedure", "procedure_occurrence_id", "procedure_date", "procedure_datetime"),
    "measurement": ("measurement", "measurement_id", "measurement_date", "measurement_datetime"),
    "observation": ("observation", "observation_id", "observation_date", "observation_datetime"),
}
_EXTRA_DEFAULTS = {
    "drug_exposure": {"days_supply": (np.int32, 30), "quantity": (np.float64, np.nan), "refills": (np.int32, 0)},
    "measurement": {
        "value": (np.float64, np.nan),
        "unit": (np.int32, 0),
        "range_low": (np.float64, np.nan),
        "range_high": (np.float64, np.nan),
    },  # fmt: skip
    "observation": {"value_as_concept_id": (np.int32, 0)},
}


def event_rows(
    table: str,
    events: EventColumns,
    pop: Population,
    visits: Visits,
    visit_id_base: int,
    id_base: int,
    rng: np.random.Generator,
) -> pa.Table:
    """Events at a random minute inside their visit (diagnoses at its start), sorted by person and time."""
    prefix, id_column, date_column, datetime_column = _EVENT_LAYOUT[table]
    cols = events.columns(_EXTRA_DEFAULTS.get(table, {}))
    visit = cols["visit"]
    span = visits.end_us[visit] - visits.start_us[visit]
    if table == "condition_occurrence":  # encounter / admission diagnoses
        span = np.zeros_like(span)
    when = visits.start_us[visit] + (rng.random(len(visit)) * span).astype(np.int64)
    when = when // _US_PER_MIN * _US_PER_MIN
    order = np.lexsort((cols["concept"], when, visits.person[visit]))
    cols = {k: v[order] for k, v in cols.items()}
    visit, when, concept = cols["visit"], when[order], cols["concept"]
    n = len(visit)
    values: dict[str, np.ndarray | pa.Array] = {
        id_column: id_base + np.arange(n),
        "person_id": pop.person_id[visits.person[visit]],
        f"{prefix}_concept_id": concept,
        date_column: when // US_PER_DAY,
        datetime_column: when,
        f"{prefix}_type_concept_id": np.full(n, cc.EHR_TYPE, np.int32),
        "visit_occurrence_id": visit_id_base + visit,
        f"{prefix}_source_value": source_values(concept),
        f"{prefix}_source_concept_id": concept,
    }
    if table == "drug_exposure":
        supply = cols["days_supply"]
        end = when + (supply.astype(np.int64) - 1) * US_PER_DAY
        values.update(
            drug_exposure_end_date=end // US_PER_DAY, drug_exposure_end_datetime=end, days_supply=supply,
            quantity=cols["quantity"], refills=cols["refills"], route_concept_id=np.zeros(n, np.int32),
        )  # fmt: skip
    elif table == "measurement":
        unit = cols["unit"]
        values.update(
            value_as_number=cols["value"], unit_concept_id=unit, range_low=cols["range_low"],
            range_high=cols["range_high"], operator_concept_id=np.zeros(n, np.int32),
            unit_source_value=pc.if_else(pa.array(unit != 0), source_values(unit), pa.nulls(n, pa.string())),
        )  # fmt: skip
    elif table == "observation":
        answer = cols["value_as_concept_id"]
        names = _names_of(answer, SMOKING_ANSWER_NAMES)
        values.update(value_as_concept_id=answer, value_as_string=names, value_source_value=names)
    elif table == "condition_occurrence":
        values["condition_status_concept_id"] = np.zeros(n, np.int32)
    elif table == "procedure_occurrence":
        values["modifier_concept_id"] = np.zeros(n, np.int32)
    return build_table(table, values)


def death_rows(
    pop: Population, hist: DiseaseHistory, window: ObservationWindow, visits: Visits, rng: np.random.Generator
) -> pa.Table:
    """Recorded deaths, with the most plausible cause among the person's diseases (or none)."""
    rows = np.flatnonzero(window.death_recorded)
    last_end = np.full(len(pop), np.iinfo(np.int64).min)
    np.maximum.at(last_end, visits.person, visits.end_us)
    day = np.floor(hist.death[rows])
    recent = lambda disease: hist.onsets[disease][rows] >= hist.death[rows] - 30.0  # noqa: E731
    has = lambda disease: np.isfinite(hist.onsets[disease][rows])  # noqa: E731
    u = rng.random(len(rows))
    cause = np.select(
        [recent("stroke"), recent("cad") & hist.cad_acute[rows], has("copd") & (u < 0.5), has("cad") & (u < 0.6),
         has("t2d") & (u < 0.2)],
        [cc.STROKE, cc.MYOCARDIAL_INFARCTION, cc.COPD, cc.CAD, cc.T2D],
        default=0,
    ).astype(np.int32)  # fmt: skip
    minute = rng.integers(0, 24 * 60, len(rows))
    when = np.maximum(
        day.astype(np.int64) * US_PER_DAY + minute * _US_PER_MIN, last_end[rows]
    )  # not before the last visit
    return build_table(
        "death",
        {
            "person_id": pop.person_id[rows],
            "death_date": day,
            "death_datetime": when,
            "death_type_concept_id": np.full(len(rows), cc.EHR_TYPE, np.int32),
            "cause_concept_id": cause,
            "cause_source_value": pc.if_else(
                pa.array(cause != 0), source_values(cause), pa.nulls(len(rows), pa.string())
            ),
        },
    )
