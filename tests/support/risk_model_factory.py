"""Tiny risk-model directories and made-up persons for the predictor and registry tests.

A person is written twice from one description: as OMOP rows that go through the preprocessing
functions (person_events / table_events with the cohort's CodeBook -> finalize_shard -> tokenize ->
timeline_table -> prediction_windows -> predict_logits), which is the offline path, and as a
PersonRecord for the online path (codes in the same form). Nothing here is real patient data.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ehrfm.meds.codes import CodeBook
from ehrfm.model.config import ModelConfig
from ehrfm.model.risk import HeadSpec, RiskModel, predict_logits, save_risk_model
from ehrfm.model.transformer import EHRDecoder
from ehrfm.omop.events import finalize_shard, person_events, table_events, visit_end_codes
from ehrfm.preprocess.timelines import timeline_table
from ehrfm.preprocess.tokenizer import Tokenizer, build_tokenizer, quantile_edges
from ehrfm.transfer.examples import example_tensors, prediction_windows
from ehrfm.transfer.value_bins import readout_from_tokenizer

PGS_IDS = ["PGS000001", "PGS000002", "PGS000003", "PGS000004"]
HB_A1C = 3004410  # the measurement with value bins
UNKNOWN_CONDITION = 999999  # never in the vocabulary
CONTEXT = 12
# The cohort's concept table: codes take the `<vocabulary>/<concept_code>` form the events stage
# writes (issue #20); 4329847 and 3038553 are left out, so they keep the id form.
CONCEPTS = pa.table(
    {
        "concept_id": pa.array([9202, 9201, 320128, 201826, 1503297, HB_A1C, 8507, 8532, 8527, 38003564], pa.int64()),
        "vocabulary_id": ["Visit", "Visit", "SNOMED", "SNOMED", "RxNorm", "LOINC", "Gender", "Gender", "Race"]
        + ["Ethnicity"],
        "concept_code": ["OP", "IP", "59621000", "44054006", "6809", "4548-4", "M", "F", "5", "Not Hispanic"],
    }
)
BOOK = CodeBook.from_concepts(CONCEPTS)


def code(domain: str, concept_id: int) -> str:
    """The event code of a concept (`SNOMED/59621000`; `CONDITION/4329847` for one the table lacks)."""
    return BOOK.code(domain, concept_id)


def visit_end(visit_concept_id: int) -> str:
    """The code at a visit's end, as the events stage writes it (`VISIT_END/Visit/OP`)."""
    return str(visit_end_codes(pa.array([code("VISIT", visit_concept_id)]))[0])


VOCAB_CODES = {
    code("VISIT", 9202): 400,
    visit_end(9202): 400,
    code("VISIT", 9201): 90,
    visit_end(9201): 90,
    code("CONDITION", 320128): 150,
    code("CONDITION", 201826): 60,
    code("CONDITION", 4329847): 40,
    code("DRUG", 1503297): 120,
    code("MEASUREMENT", HB_A1C): 300,
    code("MEASUREMENT", 3038553): 200,
    code("GENDER", 8507): 50,
    code("GENDER", 8532): 50,
    code("RACE", 8527): 60,
    "RACE/0": 40,
    code("ETHNICITY", 38003564): 70,
    "ETHNICITY/0": 30,
}


def write_tokenizer(path: Path) -> Path:
    values = np.random.default_rng(0).normal(6.0, 1.0, 300)
    tok = build_tokenizer(
        VOCAB_CODES,
        {code("MEASUREMENT", HB_A1C): quantile_edges(values, 4)},
        min_count=1,
        n_bins=4,
        min_values_for_bins=20,
        gap_edges_days=[1, 7, 30, 365],
    )
    tok.save(path)
    return path


def write_risk_model(
    directory: Path,
    tokenizer_path: Path,
    seed: int,
    platt=(1.5, -0.8),
    task: str = "t2d",
    head_inputs: str = "last+prs",
    history_windows: int = 1,
    value_codes: int = 0,
) -> Path:
    """A random-init decoder (prefix PRS fusion) + head, saved as a risk-model directory; with
    `value_codes`, a head that also reads the window's recent value bins of that many codes."""
    tok = Tokenizer.load(tokenizer_path)
    readout = readout_from_tokenizer(tok, value_codes) if value_codes else None
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        num_pgs=len(PGS_IDS),
        hidden=16,
        layers=2,
        heads=2,
        context=16,
        fusion="prefix",
        prs_tokens=2,
        prs_hidden=8,
    )
    model = RiskModel(EHRDecoder(cfg), head_inputs, value_readout=readout).eval()
    with torch.no_grad():  # head weights large enough that persons get visibly different risks
        model.head.linear.weight.normal_(0.0, 1.0)
    reference = np.quantile(np.random.default_rng(seed).uniform(0.02, 0.98, 400), np.linspace(0, 1, 101))
    spec = HeadSpec(
        task=task,
        horizon_days=730,
        context=CONTEXT,
        head_inputs=head_inputs,
        history_windows=history_windows,
        pgs_ids=list(PGS_IDS),
        tokenizer_version=tok.version,
        platt=platt,
        reference_quantiles=[float(q) for q in reference],
        metrics={"val_auroc": 0.5},
        **HeadSpec.value_fields(readout),
    )
    return save_risk_model(directory, model, spec, tokenizer_path)


@dataclass
class Person:
    """A made-up person: demographics, visits with conditions and measurements, optional PRS."""

    person_id: int
    birth: dt.date
    gender_concept_id: int
    race_concept_id: int
    ethnicity_concept_id: int
    visits: list[tuple[dt.date, dt.date, int]] = field(default_factory=list)  # start, end, type
    conditions: list[tuple[dt.date, int]] = field(default_factory=list)
    measurements: list[tuple[dt.date, int, float]] = field(default_factory=list)
    prs: dict[str, float] | None = None


def make_person(
    person_id: int, seed: int, n_visits: int, sex: int = 8532, prs: dict | None = None, unknown_code: bool = False
) -> Person:
    rng = np.random.default_rng(seed)
    birth = dt.date(1950, 1, 1) + dt.timedelta(days=int(rng.integers(0, 20 * 365)))
    person = Person(person_id, birth, sex, 8527, 38003564, prs=prs)
    day = dt.date(2010, 1, 1) + dt.timedelta(days=int(rng.integers(0, 200)))
    for v in range(n_visits):
        visit_type = 9202 if rng.random() < 0.8 else 9201
        end = day + dt.timedelta(days=0 if visit_type == 9202 else int(rng.integers(1, 4)))
        person.visits.append((day, end, visit_type))
        person.conditions.append((day, int(rng.choice([320128, 4329847]))))
        person.measurements.append((day, HB_A1C, float(np.round(rng.normal(6.0, 1.0), 2))))
        if unknown_code and v == n_visits // 2:
            person.conditions.append((day, UNKNOWN_CONDITION))
        day = end + dt.timedelta(days=int(rng.integers(3, 120)))
    return person


def person_record(person: Person, prediction_time: dt.datetime | None = None) -> dict:
    """The online request for the person (the same events the OMOP rows give)."""

    def at(date: dt.date) -> str:
        return dt.datetime.combine(date, dt.time()).isoformat()

    events = [{"code": code("VISIT", t), "time": at(s)} for s, _, t in person.visits]
    events += [{"code": visit_end(t), "time": at(e)} for _, e, t in person.visits]
    events += [{"code": code("CONDITION", c), "time": at(d)} for d, c in person.conditions]
    events += [{"code": code("MEASUREMENT", c), "time": at(d), "numeric_value": v} for d, c, v in person.measurements]
    sex = {8507: "male", 8532: "female"}[person.gender_concept_id]
    return {
        "birth_date": person.birth.isoformat(),
        "sex": sex,
        "race_concept_id": person.race_concept_id,
        "ethnicity_concept_id": person.ethnicity_concept_id,
        "events": events,
        "prs": person.prs,
        "prediction_time": None if prediction_time is None else prediction_time.isoformat(),
    }


def _omop_tables(persons: list[Person]) -> dict[str, pa.Table]:
    def dates(values):
        return pa.array(values, pa.date32())

    def no_times(n):
        return pa.nulls(n, pa.timestamp("us"))

    visits = [(p.person_id, v) for p in persons for v in p.visits]
    conditions = [(p.person_id, c) for p in persons for c in p.conditions]
    measurements = [(p.person_id, m) for p in persons for m in p.measurements]
    return {
        "person": pa.table(
            {
                "person_id": pa.array([p.person_id for p in persons], pa.int64()),
                "gender_concept_id": pa.array([p.gender_concept_id for p in persons], pa.int64()),
                "year_of_birth": pa.array([p.birth.year for p in persons], pa.int64()),
                "month_of_birth": pa.array([p.birth.month for p in persons], pa.int64()),
                "day_of_birth": pa.array([p.birth.day for p in persons], pa.int64()),
                "birth_datetime": no_times(len(persons)),
                "race_concept_id": pa.array([p.race_concept_id for p in persons], pa.int64()),
                "ethnicity_concept_id": pa.array([p.ethnicity_concept_id for p in persons], pa.int64()),
            }
        ),
        "visit_occurrence": pa.table(
            {
                "visit_occurrence_id": pa.array(range(len(visits)), pa.int64()),
                "person_id": pa.array([pid for pid, _ in visits], pa.int64()),
                "visit_concept_id": pa.array([v[2] for _, v in visits], pa.int64()),
                "visit_start_date": dates([v[0] for _, v in visits]),
                "visit_start_datetime": no_times(len(visits)),
                "visit_end_date": dates([v[1] for _, v in visits]),
                "visit_end_datetime": no_times(len(visits)),
            }
        ),
        "condition_occurrence": pa.table(
            {
                "person_id": pa.array([pid for pid, _ in conditions], pa.int64()),
                "condition_concept_id": pa.array([c[1] for _, c in conditions], pa.int64()),
                "condition_start_date": dates([c[0] for _, c in conditions]),
                "condition_start_datetime": no_times(len(conditions)),
                "visit_occurrence_id": pa.nulls(len(conditions), pa.int64()),
            }
        ),
        "measurement": pa.table(
            {
                "person_id": pa.array([pid for pid, _ in measurements], pa.int64()),
                "measurement_concept_id": pa.array([m[1] for _, m in measurements], pa.int64()),
                "measurement_date": dates([m[0] for _, m in measurements]),
                "measurement_datetime": no_times(len(measurements)),
                "value_as_number": pa.array([m[2] for _, m in measurements], pa.float64()),
                "visit_occurrence_id": pa.nulls(len(measurements), pa.int64()),
            }
        ),
    }


def offline_timelines(persons: list[Person], tokenizer: Tokenizer) -> pa.Table:
    """timelines/ rows for the persons through the preprocessing functions (persons sorted by id)."""
    tables = _omop_tables(persons)
    parts = [person_events(tables["person"], BOOK)[0]]
    for name in ("visit_occurrence", "condition_occurrence", "measurement"):
        parts.append(table_events(name, tables[name], BOOK)[0])
    events = finalize_shard(pa.concat_tables(parts, promote_options="permissive"))
    timelines = tokenizer.tokenize(events)
    by_id = {p.person_id: p for p in persons}
    prs = np.zeros((len(timelines.subject_id), len(PGS_IDS)), dtype=np.float32)
    has_prs = np.zeros(len(timelines.subject_id), dtype=bool)
    for row, pid in enumerate(timelines.subject_id):
        if by_id[int(pid)].prs:
            has_prs[row] = True
            prs[row] = [by_id[int(pid)].prs.get(k, 0.0) for k in PGS_IDS]
    splits = np.ones(len(timelines.subject_id), dtype=np.int64)  # all val
    return timeline_table(timelines, splits, prs, has_prs)


def offline_risks(model: RiskModel, spec: HeadSpec, timelines: pa.Table, labels: pa.Table) -> dict[str, np.ndarray]:
    """Risks (PRS as stored and masked) for label rows, through prediction_windows + predict_logits."""
    examples = prediction_windows(timelines, labels, spec.context, spec.history_windows)
    batch = example_tensors(examples)
    return {
        "tokens": examples["tokens"].to_pylist(),
        "risk": spec.calibrate(predict_logits(model, batch).numpy()),
        "risk_prs_masked": spec.calibrate(predict_logits(model, batch, mask_prs=True).numpy()),
    }


def labels_at(rows: list[tuple[int, dt.datetime]]) -> pa.Table:
    return pa.table(
        {
            "subject_id": pa.array([r[0] for r in rows], pa.int64()),
            "prediction_time": pa.array([r[1] for r in rows], pa.timestamp("us")),
            "boolean_value": pa.array([False] * len(rows)),
        }
    )
