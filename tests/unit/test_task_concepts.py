"""Issue #18 on hand-made persons: source codes, units, clinical-drug metformin, inpatient insulin,
T2D before / after the prediction time, several prediction times per person, unmapped rows."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ehrfm.meds.codes import CodeBook
from ehrfm.omop.events import table_events
from ehrfm.omop.units import canonical_values, convert_threshold, normalise_unit
from ehrfm.schemas import EVENT_SCHEMA
from ehrfm.tasks.concept_sets import dataset_codebook
from ehrfm.tasks.definitions import load_task, resolve_task
from ehrfm.tasks.labeler import choose_prediction_times, event_shards, label_events, label_statuses, main

T0 = datetime(2010, 1, 1, 9, 0)


def day(d: float) -> datetime:
    return T0 + timedelta(days=d)


def events(rows: list[tuple]) -> pa.Table:
    """Rows (subject, day, code[, value[, visit_id[, visit_type]]]) -> an EVENT_SCHEMA table."""
    cols = {name: [] for name in EVENT_SCHEMA.names}
    for row in rows:
        subject, when, code, value, visit, kind = (list(row) + [None, None, None])[:6]
        cols["subject_id"].append(subject)
        cols["time"].append(None if when is None else day(when))
        cols["code"].append(code)
        cols["numeric_value"].append(value)
        cols["visit_id"].append(visit)
        cols["visit_type"].append(kind if kind is not None else (None if visit is None else "9202"))
    return pa.table(cols, schema=EVENT_SCHEMA)


def person(subject: int, extra: list[tuple] = (), last_day: float = 1000.0) -> list[tuple]:
    """One candidate prediction time (the visit ending on day 10); a last visit on `last_day`."""
    v = subject * 10
    return [
        (subject, -20000, "MEDS_BIRTH"),
        (subject, 5, "VISIT/9202", None, v),
        (subject, 10, "CONDITION/260139", None, v),
        (subject, last_day, "VISIT/9202", None, v + 1),
        *extra,
    ]


def statuses(table: pa.Table, task_name: str = "t2d", **changes) -> dict[int, tuple]:
    task = resolve_task(load_task(task_name, [f"{k}={v}" for k, v in changes.items()]))
    frame = label_statuses(table, task)
    return {r["subject_id"]: (r["status"], r["boolean_value"]) for r in frame.iter_rows(named=True)}


# ---- the events stage: unmapped rows keep their source; units are converted --------------------
def test_unmapped_rows_are_coded_by_their_source_value():
    conditions = pa.table(
        {
            "person_id": pa.array([1, 1, 1, 1], pa.int64()),
            "condition_concept_id": pa.array([0, None, 201826, 0], pa.int64()),
            "condition_start_date": pa.array([date(2020, 1, d) for d in (1, 2, 3, 4)], pa.date32()),
            "condition_start_datetime": pa.nulls(4, pa.timestamp("us")),
            "visit_occurrence_id": pa.nulls(4, pa.int64()),
            "condition_source_value": pa.array([" E11.9 ", "250.00", "44054006", None], pa.string()),
        }
    )
    out, counts = table_events("condition_occurrence", conditions)
    assert out["code"].to_pylist() == [
        "CONDITION/source/E11.9",
        "CONDITION/source/250.00",
        "CONDITION/201826",
        "CONDITION/0",
    ]
    assert (counts.unmapped_rows, counts.unmapped_coded_by_source) == (3, 2)
    assert counts.as_dict()["unmapped_rows"] == 3


def test_hba1c_in_mmol_per_mol_is_converted_to_percent_and_implausible_values_dropped():
    concept = pa.array([3004410] * 5 + [3004501, 3038553], pa.int64())
    values = pa.array([48.0, 6.5, 53.0, 140.0, 6.0, 7.0, 30.0], pa.float64())
    unit_concept = pa.array([9579, 8554, None, None, None, 8753, None], pa.int64())
    unit_text = pa.array([None, None, "mmol/mol", "%", None, None, "kg/m2"], pa.string())
    out, counts = canonical_values(concept, values, unit_concept, unit_text)
    got = out.to_pylist()
    assert got[0] == pytest.approx(6.543, abs=1e-3)  # 48 mmol/mol = 6.5 %
    assert got[1] == 6.5 and got[2] == pytest.approx(7.00, abs=0.01)
    assert got[3] is None  # "140 %" is not an HbA1c
    assert got[4] == 6.0  # no unit: plausible as %, kept
    assert got[5] == pytest.approx(126.1, abs=0.1)  # glucose 7 mmol/L = 126 mg/dL
    assert got[6] == 30.0  # BMI: not a handled analyte, as recorded
    assert counts["unit:hba1c:mmol/mol"] == 2 and counts["unit:hba1c:%"] == 2 and counts["unit:hba1c:missing"] == 1
    assert counts["values_converted"] == 3 and counts["values_implausible"] == 1


def test_threshold_units_convert_and_unknown_units_are_errors():
    assert convert_threshold(3004410, 48, "mmol/mol") == pytest.approx(6.543, abs=1e-3)
    assert convert_threshold(3004410, 6.5, "%") == 6.5
    assert convert_threshold(3004501, 7.0, "mmol/L") == pytest.approx(126.1, abs=0.1)
    assert normalise_unit("mg/dL") == "mg/dL" and normalise_unit(" MMOL/MOL ") == "mmol/mol"
    with pytest.raises(ValueError, match="not convertible"):
        convert_threshold(3004410, 6.5, "mg/dL")


def test_hba1c_threshold_in_mmol_per_mol_equals_the_percent_threshold():
    table = events(
        person(1, [(1, 9, "MEASUREMENT/3004410", 6.6)])  # above 6.5 % = 48 mmol/mol
        + person(2, [(2, 9, "MEASUREMENT/3004410", 6.4)])  # below
    )
    as_percent = statuses(table)
    in_ifcc = statuses(table, **{"prior.measurement": '[{"concept_id": 3004410, "value": 48, "unit": "mmol/mol"}]'})
    assert as_percent == in_ifcc == {1: ("prior_measurement", None), 2: ("labeled", False)}


# ---- concept sets --------------------------------------------------------------------------------
def test_icd10_source_code_with_unmapped_concept_counts_as_t2d():
    table = events(
        person(1, [(1, 3, "CONDITION/source/E11.9")])  # before: prevalent
        + person(2, [(2, 300, "CONDITION/source/E119")])  # after, dotless: incident
        + person(3, [(3, 300, "CONDITION/source/250.02")])  # ICD-9 type II uncontrolled
        + person(4, [(4, 300, "CONDITION/source/250.01")])  # ICD-9 type I: not T2D
        + person(5, [(5, 300, "CONDITION/4193704")])  # a standard descendant (shipped list)
    )
    assert statuses(table) == {
        1: ("prior_condition", None),
        2: ("labeled", True),
        3: ("labeled", True),
        4: ("labeled", False),
        5: ("labeled", True),
    }
    # Without expansion only the seed ids count.
    assert statuses(table, expand_descendants="false")[2] == ("labeled", False)


def test_clinical_drug_metformin_matches_the_ingredient():
    table = events(
        person(1, [(1, 3, "DRUG/40163924")])  # metformin ER 500 MG tablet (clinical drug)
        + person(2, [(2, 3, "DRUG/source/Metformin HCl 500mg tab")])  # unmapped, named
        + person(3, [(3, 3, "DRUG/1112807")])  # aspirin: no
    )
    assert statuses(table) == {1: ("prior_drug", None), 2: ("prior_drug", None), 3: ("labeled", False)}


def test_inpatient_sliding_scale_insulin_is_not_evidence_of_diabetes():
    table = events(
        person(1, [(1, 2, "VISIT/9201", None, 99, "9201"), (1, 3, "DRUG/1596977", None, 99, "9201")])
        + person(2, [(2, 3, "DRUG/1596977", None, 20, "9202")])  # outpatient insulin
    )
    assert statuses(table) == {1: ("labeled", False), 2: ("prior_drug", None)}
    # Configurable: with no inpatient visit types, inpatient insulin counts again.
    assert statuses(table, inpatient_visit_types="[]")[1] == ("prior_drug", None)


def test_t2d_coded_before_or_after_the_prediction_time():
    table = events(
        person(1, [(1, 9, "CONDITION/201826")])  # the day before: prior
        + person(2, [(2, 11, "CONDITION/201826")])  # the day after: positive
        + person(3, [(3, 10 + 731, "CONDITION/201826")])  # after the horizon: negative
    )
    assert statuses(table) == {1: ("prior_condition", None), 2: ("labeled", True), 3: ("labeled", False)}


# ---- several prediction times per person ---------------------------------------------------------
def yearly_person(subject: int, extra: list[tuple] = ()) -> list[tuple]:
    """Visits ending on days 0, 100, 400, 800, 1200, 1600, 3000 (the last is never a candidate)."""
    rows = [(subject, -20000, "MEDS_BIRTH")]
    for i, d in enumerate((0, 100, 400, 800, 1200, 1600, 3000)):
        rows.append((subject, d, "VISIT/9202", None, subject * 100 + i))
    return rows + list(extra)


def test_landmarks_are_yearly_capped_and_excluded_per_prediction_time():
    table = events(yearly_person(1, [(1, 1000, "CONDITION/201826")]))
    landmarks = choose_prediction_times(
        pl_frame(table), 0, load_task("t2d", ["prediction_times.max_per_person=10"]).prediction_times
    )
    got = [(t - T0).days for t in landmarks["prediction_time"].to_list()]
    assert got == [0, 400, 800, 1200, 1600]  # day 100 is in the first year's window
    rows = label_statuses(table, resolve_task(load_task("t2d", ["prediction_times.max_per_person=10"])))
    by_day = {(r["prediction_time"] - T0).days: (r["status"], r["boolean_value"]) for r in rows.iter_rows(named=True)}
    assert by_day == {
        0: ("labeled", False),  # T2D on day 1000 is beyond 730 days
        400: ("labeled", True),
        800: ("labeled", True),
        1200: ("prior_condition", None),
        1600: ("prior_condition", None),
    }
    capped = label_statuses(table, resolve_task(load_task("t2d")))  # the shipped cap: 3
    assert capped.height == 3 and capped["prediction_time"].is_sorted()
    _, account = label_events(table, resolve_task(load_task("t2d", ["prediction_times.max_per_person=10"])))
    assert (account.persons_in, account.persons_labeled, account.persons_positive) == (1, 1, 1)
    assert (account.prediction_times, account.labeled, account.positive) == (5, 3, 2)
    assert account.excluded["prior_condition"] == 2
    assert account.concept_persons["target:condition/201826"] == 1


def test_every_eligible_visit_with_zero_gap_and_the_draw_is_stable():
    table = events(yearly_person(1) + yearly_person(2))
    times = load_task("t2d", ["prediction_times.min_gap_days=0", "prediction_times.max_per_person=4"]).prediction_times
    first = choose_prediction_times(pl_frame(table), 0, times)
    again = choose_prediction_times(pl_frame(table.take(list(reversed(range(table.num_rows))))), 0, times)
    assert first.equals(again.sort("subject_id", "prediction_time"))
    assert first.group_by("subject_id").len()["len"].to_list() == [4, 4]


def pl_frame(table: pa.Table):
    import polars as pl

    return pl.from_arrow(table)


def test_unmapped_labs_get_their_own_vocabulary_entries_and_value_bins():
    import numpy as np

    from ehrfm.preprocess.tokenizer import build_tokenizer, fit_value_edges

    n = 40
    measurement = pa.table(
        {
            "person_id": pa.array([1] * n, pa.int64()),
            "measurement_concept_id": pa.array([0] * n, pa.int64()),
            "measurement_date": pa.array([date(2020, 1, 1)] * n, pa.date32()),
            "measurement_datetime": pa.nulls(n, pa.timestamp("us")),
            "value_as_number": pa.array([float(i) for i in range(n // 2)] + [1000.0 + i for i in range(n // 2)]),
            "visit_occurrence_id": pa.nulls(n, pa.int64()),
            "measurement_source_value": pa.array(["LAB_A"] * (n // 2) + ["LAB_B"] * (n // 2), pa.string()),
        }
    )
    out, _ = table_events("measurement", measurement)
    codes = out["code"].to_numpy(zero_copy_only=False)
    values = out["numeric_value"].to_numpy(zero_copy_only=False)
    counts = {c: int((codes == c).sum()) for c in set(codes)}
    assert counts == {"MEASUREMENT/source/LAB_A": n // 2, "MEASUREMENT/source/LAB_B": n // 2}
    edges = {c: fit_value_edges(values[codes == c], 4, 10) for c in counts}
    tok = build_tokenizer(counts, edges, min_count=1, n_bins=4, min_values_for_bins=10, gap_edges_days=[1, 7])
    assert {"MEASUREMENT/source/LAB_A", "MEASUREMENT/source/LAB_B"} <= set(tok.tokens)
    a, b = tok.value_edges["MEASUREMENT/source/LAB_A"], tok.value_edges["MEASUREMENT/source/LAB_B"]
    assert max(a) < 20 < 1000 < min(b)  # each lab on its own scale
    assert np.all(np.diff(a) > 0)


# ---- the code form: concept ids become the codes the events were written with (issue #20) -------
CONCEPTS = pl.DataFrame(  # a tiny OMOP concept table (text, as read from CSV)
    {
        "concept_id": ["201826", "1503297", "3004410", "0"],
        "concept_name": ["Type 2 diabetes mellitus", "metformin", "Hemoglobin A1c", "No matching concept"],
        "domain_id": ["Condition", "Drug", "Measurement", "Metadata"],
        "vocabulary_id": ["SNOMED", "RxNorm", "LOINC", "None"],
        "concept_code": ["44054006", "6809", "4548-4", "No matching concept"],
    }
)


def test_concept_sets_take_the_vocabulary_form_from_the_concept_table():
    task = resolve_task(load_task("t2d"), None, CONCEPTS)
    target = task.target.codes["condition"]
    assert "SNOMED/44054006" in target and "CONDITION/201826" not in target
    assert "CONDITION/4193704" in target  # a shipped descendant the table lacks keeps the id form
    prior = task.prior.codes
    assert "RxNorm/6809" in prior["drug"] and "LOINC/4548-4" in prior["measurement"]
    assert task.prior.thresholds[0][0] == "LOINC/4548-4"  # HbA1c threshold on the vocabulary code
    # Same concepts, same counts and source patterns as the id form: only the names change.
    plain = resolve_task(load_task("t2d"))
    assert [len(c.codes) for c in task.prior.concepts] == [len(c.codes) for c in plain.prior.concepts]
    assert [c.source_pattern for c in task.prior.concepts] == [c.source_pattern for c in plain.prior.concepts]
    # A table without vocabulary_id / concept_code (or none at all) gives the id form.
    bare = resolve_task(load_task("t2d"), None, CONCEPTS.select("concept_id", "concept_name", "domain_id"))
    assert bare.target.codes == plain.target.codes and "CONDITION/201826" in plain.target.codes["condition"]


def test_labels_are_the_same_whichever_code_form_the_events_carry():
    rows = (
        person(1, [(1, 9, "CONDITION/201826")])  # prior
        + person(2, [(2, 11, "CONDITION/201826")])  # positive
        + person(3, [(3, 9, "MEASUREMENT/3004410", 6.6)])  # HbA1c above threshold: prior
        + person(4, [(4, 9, "CONDITION/source/E11.9")])  # unmapped: the source pattern, both forms
        + person(5)  # negative
    )
    renamed = {"CONDITION/201826": "SNOMED/44054006", "MEASUREMENT/3004410": "LOINC/4548-4", "VISIT/9202": "Visit/OP"}
    vocab_rows = [(r[0], r[1], renamed.get(r[2], r[2]), *r[3:]) for r in rows]
    plain = statuses(events(rows))
    by_vocab = label_statuses(events(vocab_rows), resolve_task(load_task("t2d"), None, CONCEPTS))
    assert {r["subject_id"]: (r["status"], r["boolean_value"]) for r in by_vocab.iter_rows(named=True)} == plain
    assert plain == {
        1: ("prior_condition", None),
        2: ("labeled", True),
        3: ("prior_measurement", None),
        4: ("prior_condition", None),
        5: ("labeled", False),
    }
    # Id-form codes resolved for vocabulary-form events match nothing: the forms must agree.
    mismatched = label_statuses(events(vocab_rows), resolve_task(load_task("t2d")))
    assert mismatched.filter(pl.col("boolean_value").fill_null(False)).height == 0


def test_the_labeler_reads_the_codes_of_a_meds_dataset(tmp_path):
    root = tmp_path / "dataset"
    (root / "data" / "train").mkdir(parents=True)
    (root / "metadata").mkdir()
    rows = person(1, [(1, 11, "SNOMED/44054006")]) + person(2)
    pq.write_table(events(rows), root / "data" / "train" / "0.parquet")
    book = CodeBook.from_concepts(CONCEPTS)
    pq.write_table(book.codes_metadata(["SNOMED/44054006", "Visit/OP"]), root / "metadata" / "codes.parquet")
    assert event_shards(root) == [str(root / "data" / "train" / "0.parquet")]
    found = dataset_codebook(root / "data" / "train")
    assert found is not None and found.code("CONDITION", 201826) == "SNOMED/44054006"
    assert dataset_codebook(tmp_path) is None
    assert main(["--events", str(root), "--task", "t2d", "--out", str(tmp_path / "labels")]) == 0
    account = json.loads((tmp_path / "labels" / "account.json").read_text())
    assert (account["labeled"], account["positive"]) == (2, 1)
    assert account["concept_persons"]["target:condition/201826"] == 1
