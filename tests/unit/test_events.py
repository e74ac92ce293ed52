"""OMOP rows -> MEDS events, per table, on small hand-made CDM v5.4 tables; and the ingest pieces
(in-unit duplicate tracking, cross-file duplicate resolution, parquet key-range planning)."""

from __future__ import annotations

import datetime as dt

import meds
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ehrfm.omop.events import (
    DAY_US,
    PRIORITY_COLUMN,
    code_priority,
    death_events,
    fill_visit_types,
    finalize_shard,
    person_events,
    place_meds_events,
    stage_meds,
    table_events,
)  # fmt: skip
from ehrfm.omop.spec import CDM_TABLES
from ehrfm.preprocess.ingest import SeenKeys, Unit, duplicate_keys, primary_key, tables_needing_key_check
from ehrfm.schemas import EVENT_SCHEMA

D, T = dt.date, dt.datetime


def cdm(table: str, rows: list[dict]) -> pa.Table:
    """Rows typed as validated CDM v5.4 rows (absent columns null)."""
    schema = CDM_TABLES[table].arrow_schema
    return pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in rows], schema=schema)


def rows_of(events: pa.Table) -> list[tuple]:
    return list(
        zip(*(events[c].to_pylist() for c in ("subject_id", "time", "code", "numeric_value", "visit_id", "visit_type")))
    )


def test_visit_gives_start_and_end_events_typed_by_visit_concept() -> None:
    visits = cdm(
        "visit_occurrence",
        [
            {
                "visit_occurrence_id": 7,
                "person_id": 1,
                "visit_concept_id": 9201,
                "visit_start_date": D(2020, 3, 1),
                "visit_start_datetime": T(2020, 3, 1, 8, 30),
                "visit_end_date": D(2020, 3, 4),
                "visit_end_datetime": T(2020, 3, 4, 11, 0),
                "visit_type_concept_id": 32817,
            },
            # date-only end on the start day: the end must not precede the start
            {
                "visit_occurrence_id": 8,
                "person_id": 2,
                "visit_concept_id": 9202,
                "visit_start_date": D(2021, 5, 2),
                "visit_start_datetime": T(2021, 5, 2, 16, 0),
                "visit_end_date": D(2021, 5, 2),
                "visit_type_concept_id": 32817,
            },
        ],
    )
    events, counts = table_events("visit_occurrence", visits)
    assert sorted(rows_of(events)) == sorted(
        [
            (1, T(2020, 3, 1, 8, 30), "VISIT/9201", None, 7, "9201"),
            (1, T(2020, 3, 4, 11, 0), "VISIT_END/9201", None, 7, "9201"),
            (2, T(2021, 5, 2, 16, 0), "VISIT/9202", None, 8, "9202"),
            (2, T(2021, 5, 2, 16, 0), "VISIT_END/9202", None, 8, "9202"),
        ]
    )
    assert counts.events == 4


def test_clinical_rows_use_datetime_only_when_it_falls_on_the_date() -> None:
    measurement = cdm(
        "measurement",
        [
            {
                "measurement_id": 1,
                "person_id": 5,
                "measurement_concept_id": 3004410,
                "measurement_date": D(2019, 1, 2),
                "measurement_datetime": T(2019, 1, 2, 9, 15),
                "measurement_type_concept_id": 32817,
                "value_as_number": 6.7,
                "visit_occurrence_id": 70,
            },
            # datetime on another day than the (validated) date: the date decides, at midnight
            {
                "measurement_id": 2,
                "person_id": 5,
                "measurement_concept_id": 3004410,
                "measurement_date": D(2019, 1, 3),
                "measurement_datetime": T(2019, 1, 9, 9, 15),
                "measurement_type_concept_id": 32817,
            },
            # beyond float32 and a null concept: reported, not silently changed
            {
                "measurement_id": 3,
                "person_id": 5,
                "measurement_concept_id": None,
                "measurement_date": D(2019, 1, 4),
                "measurement_type_concept_id": 32817,
                "value_as_number": 1e300,
            },
        ],
    )
    events, counts = table_events("measurement", measurement)
    assert rows_of(events) == [
        (5, T(2019, 1, 2, 9, 15), "MEASUREMENT/3004410", pytest.approx(6.7), 70, None),
        (5, T(2019, 1, 3), "MEASUREMENT/3004410", None, None, None),
        (5, T(2019, 1, 4), "MEASUREMENT/0", None, None, None),
    ]
    assert events.schema.field("numeric_value").type == pa.float32()
    assert (counts.null_concept_ids, counts.values_beyond_float32, counts.events) == (1, 1, 3)


@pytest.mark.parametrize(
    "table,column,prefix",
    [
        ("condition_occurrence", "condition_concept_id", "CONDITION"),
        ("drug_exposure", "drug_concept_id", "DRUG"),
        ("procedure_occurrence", "procedure_concept_id", "PROCEDURE"),
        ("device_exposure", "device_concept_id", "DEVICE"),
        ("observation", "observation_concept_id", "OBSERVATION"),
    ],
)
def test_every_clinical_table_is_namespaced_by_domain(table: str, column: str, prefix: str) -> None:
    spec = CDM_TABLES[table]
    row = {
        spec.primary_key[0]: 1,
        "person_id": 3,
        column: 201826,
        spec.start_date: D(2018, 6, 1),
        "visit_occurrence_id": 12,
    }
    if spec.end_date and CDM_TABLES[table].column(spec.end_date).required:
        row[spec.end_date] = D(2018, 6, 2)
    events, _ = table_events(table, cdm(table, [row]))
    assert rows_of(events) == [(3, T(2018, 6, 1), f"{prefix}/201826", None, 12, None)]
    assert events[PRIORITY_COLUMN].to_pylist() == code_priority(events["code"]).tolist()


def test_person_and_death_events() -> None:
    person = cdm(
        "person",
        [
            {
                "person_id": 1,
                "gender_concept_id": 8532,
                "year_of_birth": 1950,
                "month_of_birth": 4,
                "day_of_birth": 9,
                "race_concept_id": 8527,
                "ethnicity_concept_id": 38003564,
            },
            {
                "person_id": 2,
                "gender_concept_id": 8507,
                "year_of_birth": 1970,
                "birth_datetime": T(1970, 2, 3, 10, 0),
                "race_concept_id": 0,
                "ethnicity_concept_id": 0,
            },
            {
                "person_id": 3,
                "gender_concept_id": 8507,
                "year_of_birth": 1980,  # month/day default to 1
                "race_concept_id": 0,
                "ethnicity_concept_id": 0,
            },
        ],
    )
    events, counts = person_events(person)
    got = sorted(rows_of(events))
    assert got == sorted(
        [
            (1, T(1950, 4, 9), "MEDS_BIRTH", None, None, None),
            (1, T(1950, 4, 9), "GENDER/8532", None, None, None),
            (1, T(1950, 4, 9), "RACE/8527", None, None, None),
            (1, T(1950, 4, 9), "ETHNICITY/38003564", None, None, None),
            (2, T(1970, 2, 3, 10), "MEDS_BIRTH", None, None, None),
            (2, T(1970, 2, 3, 10), "GENDER/8507", None, None, None),
            (2, T(1970, 2, 3, 10), "RACE/0", None, None, None),
            (2, T(1970, 2, 3, 10), "ETHNICITY/0", None, None, None),
            (3, T(1980, 1, 1), "MEDS_BIRTH", None, None, None),
            (3, T(1980, 1, 1), "GENDER/8507", None, None, None),
            (3, T(1980, 1, 1), "RACE/0", None, None, None),
            (3, T(1980, 1, 1), "ETHNICITY/0", None, None, None),
        ]
    )
    assert meds.birth_code == "MEDS_BIRTH" and counts.events == 12
    death = cdm("death", [{"person_id": 1, "death_date": D(2001, 7, 1), "death_datetime": T(2001, 7, 1, 23, 0)}])
    events, _ = death_events(death)
    assert rows_of(events) == [(1, T(2001, 7, 1, 23), "MEDS_DEATH", None, None, None)]


def staged(rows: list[tuple]) -> pa.Table:
    table = pa.table(
        {
            "subject_id": pa.array([r[0] for r in rows], pa.int64()),
            "time": pa.array([r[1] for r in rows], pa.timestamp("us")),
            "code": pa.array([r[2] for r in rows], pa.string()),
            "numeric_value": pa.array([r[3] for r in rows], pa.float32()),
            "visit_id": pa.array([r[4] for r in rows], pa.int64()),
            "visit_type": pa.array([r[5] for r in rows], pa.string()),
        }
    )
    return table.append_column(PRIORITY_COLUMN, pa.array(code_priority(table["code"])))


def test_shard_is_sorted_meds_with_visit_types_from_the_same_subjects_visit() -> None:
    rows = [
        (2, T(2020, 1, 1), "CONDITION/1", None, 9, None),  # subject 2 has no visit 9: stays untyped
        (1, T(2020, 1, 1, 10), "MEASUREMENT/5", 3.0, 9, None),
        (1, T(2020, 1, 1, 9), "VISIT/9202", None, 9, "9202"),
        (1, T(2020, 1, 1, 10), "MEASUREMENT/5", 1.0, 9, None),
        (1, T(2020, 1, 1, 9), "VISIT_END/9202", None, 9, "9202"),
        (1, T(1960, 1, 1), "MEDS_BIRTH", None, None, None),
    ]
    events = finalize_shard(staged(rows))
    assert events.schema == EVENT_SCHEMA
    meds.DataSchema.validate(events)
    assert rows_of(events) == [
        (1, T(1960, 1, 1), "MEDS_BIRTH", None, None, None),
        (1, T(2020, 1, 1, 9), "VISIT/9202", None, 9, "9202"),
        (1, T(2020, 1, 1, 9), "VISIT_END/9202", None, 9, "9202"),
        (1, T(2020, 1, 1, 10), "MEASUREMENT/5", 1.0, 9, "9202"),
        (1, T(2020, 1, 1, 10), "MEASUREMENT/5", 3.0, 9, "9202"),
        (2, T(2020, 1, 1), "CONDITION/1", None, 9, None),
    ]
    assert fill_visit_types(staged(rows[:2])).column("visit_type").to_pylist() == [None, None]


def test_meds_input_rows_are_placed_or_dropped_with_one_reason_each() -> None:
    raw = pa.table(
        {
            "subject_id": pa.array([1, 1, 1, 1, None, 2, 3, 3], pa.int64()),
            "time": pa.array(
                [
                    T(1990, 1, 1),
                    None,
                    T(1989, 12, 31),
                    T(2000, 1, 1),
                    T(2000, 1, 1),
                    T(2000, 1, 1),
                    T(1995, 1, 1),
                    T(2001, 1, 1),
                ],
                pa.timestamp("us"),
            ),
            "code": pa.array(
                ["MEDS_BIRTH", "GENDER/F", "DX/1", "DX/2", "DX/3", "DX/4", "MEDS_BIRTH", None], pa.string()
            ),
            "numeric_value": pa.array([None] * 8, pa.float32()),
        }
    )
    kept, dropped = place_meds_events(stage_meds(raw))
    assert sorted(zip(kept["subject_id"].to_pylist(), kept["code"].to_pylist(), kept["time"].to_pylist())) == [
        (1, "DX/2", T(2000, 1, 1)),
        (1, "GENDER/F", T(1990, 1, 1)),
        (1, "MEDS_BIRTH", T(1990, 1, 1)),
        (3, "MEDS_BIRTH", T(1995, 1, 1)),
    ]
    assert sorted(dropped["reason"].to_pylist()) == [
        "before_birth",
        "missing_code",
        "missing_subject_id",
        "no_birth_event",
    ]
    assert kept.num_rows + dropped.num_rows == raw.num_rows


def test_meds_input_with_wrong_types_is_rejected_naming_the_column() -> None:
    raw = pa.table({"subject_id": pa.array(["a"]), "time": pa.array([T(2000, 1, 1)]), "code": pa.array(["X"])})
    with pytest.raises(ValueError, match="subject_id"):
        stage_meds(raw)


# ---- ingest pieces --------------------------------------------------------------------------------
def test_seen_keys_keep_first_occurrence_across_batches() -> None:
    seen = SeenKeys()
    batches = [np.array([5, 3, 5, 9]), np.array([3, 4, 10]), np.array([9, 11, 11]), np.array([4, 12])]
    kept = [seen.first_new(b, np.ones(len(b), bool)).tolist() for b in batches]
    assert kept == [[True, True, False, True], [False, True, True], [False, True, False], [False, True]]
    # null keys are never duplicates
    assert seen.first_new(np.array([5, 0]), np.array([False, False])).tolist() == [True, True]


def test_composite_keys_are_packed_exactly_and_range_checked() -> None:
    table = cdm(
        "concept_ancestor",
        [
            {
                "ancestor_concept_id": 1,
                "descendant_concept_id": 2,
                "min_levels_of_separation": 0,
                "max_levels_of_separation": 0,
            },
            {
                "ancestor_concept_id": 2,
                "descendant_concept_id": 1,
                "min_levels_of_separation": 0,
                "max_levels_of_separation": 0,
            },
        ],
    )
    keys, valid = primary_key("concept_ancestor", table)
    assert keys.tolist() == [(1 << 32) | 2, (2 << 32) | 1] and valid.all()
    bad = cdm(
        "concept_ancestor",
        [
            {
                "ancestor_concept_id": -1,
                "descendant_concept_id": 2,
                "min_levels_of_separation": 0,
                "max_levels_of_separation": 0,
            }
        ],
    )
    with pytest.raises(ValueError, match="concept_ancestor"):
        primary_key("concept_ancestor", bad)


def test_cross_unit_duplicates_resolve_to_the_earliest_unit() -> None:
    keys = pa.table(
        {
            "table_code": pa.array([4, 4, 4, 5, 4, 4], pa.int16()),
            "unit": pa.array([2, 0, 1, 0, 3, 1], pa.int32()),
            "key": pa.array([10, 10, 11, 10, 10, 12], pa.int64()),
        }
    )
    got = duplicate_keys(keys)
    assert sorted(zip(*(got[c].to_pylist() for c in ("table_code", "unit", "key")))) == [(4, 2, 10), (4, 3, 10)]


def test_key_check_planned_only_when_files_may_share_keys(tmp_path) -> None:
    def part(name: str, ids: list[int]) -> str:
        path = tmp_path / name
        pq.write_table(pa.table({"condition_occurrence_id": pa.array(ids, pa.int64())}), path)
        return str(path)

    disjoint = [
        Unit("condition_occurrence", part("a.parquet", [1, 5]), 0),
        Unit("condition_occurrence", part("b.parquet", [6, 9]), 1),
    ]
    overlapping = [
        Unit("drug_exposure", part("c.parquet", [1, 5]), 0),
        Unit("drug_exposure", part("d.parquet", [5, 9]), 1),
    ]
    csv_files = [Unit("measurement", str(tmp_path / "m1.csv"), 0), Unit("measurement", str(tmp_path / "m2.csv"), 1)]
    single = [Unit("observation", str(tmp_path / "o.csv"), 0)]
    assert tables_needing_key_check(disjoint + overlapping + csv_files + single) == ["drug_exposure", "measurement"]


def test_day_arithmetic_floors_before_1970() -> None:
    events, _ = table_events(
        "condition_occurrence",
        cdm(
            "condition_occurrence",
            [
                {
                    "condition_occurrence_id": 1,
                    "person_id": 1,
                    "condition_concept_id": 1,
                    "condition_start_date": D(1969, 12, 31),
                    "condition_start_datetime": T(1969, 12, 31, 23, 0),
                    "condition_type_concept_id": 1,
                }
            ],
        ),
    )
    us = events["time"].cast(pa.int64()).to_pylist()[0]
    assert np.floor_divide(us, DAY_US) == -1


def test_code_priority_is_decided_by_prefix_for_every_row_and_chunk_layout() -> None:
    """Per distinct code, gathered per row: repeated codes, nulls, chunked and large-string input
    all give the row-by-row answer (birth and death only as whole codes, the last prefix winning)."""
    cases = {
        "MEDS_BIRTH": 0,
        "MEDS_BIRTHDAY/1": 5,  # shares the birth prefix but is not the birth code
        "GENDER/8532": 1,
        "Gender/F": 1,
        "RACE/0": 2,
        "Ethnicity/Hispanic": 3,
        "VISIT/9201": 4,
        "VISIT_END/Visit/IP": 8,
        "MEDS_DEATH": 9,
        "MEDS_DEATH/cause": 5,
        "SNOMED/44054006": 5,
        "": 5,
    }
    rng = np.random.default_rng(0)
    rows = [list(cases)[i] for i in rng.integers(0, len(cases), 500)] + [None, "GENDER/8532", None]
    expected = [5 if code is None else cases[code] for code in rows]
    assert code_priority(pa.array(rows)).tolist() == expected
    assert code_priority(pa.chunked_array([rows[:200], rows[200:]])).tolist() == expected
    assert code_priority(pa.array(rows, pa.large_string())).tolist() == expected
    assert code_priority(pa.array([], pa.string())).tolist() == []
