"""The MEDS writer's boundary: static codes to a null time and back, split files, metadata checked by `meds`."""

from __future__ import annotations

import datetime as dt
import json

import meds
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ehrfm.meds.codes import CodeBook
from ehrfm.meds.layout import NotMedsDatasetError
from ehrfm.meds.writer import MEDS_DATA_SCHEMA, meds_rows, read_events, read_shard, write_metadata, write_shard
from ehrfm.omop.events import (
    CONCEPT_COLUMN,
    PRIORITY_COLUMN,
    code_priority,
    finalize_shard,
    person_events,
    table_events,
)
from ehrfm.omop.spec import CDM_TABLES

BOOK = CodeBook.from_concepts(
    pl.DataFrame(
        {
            "concept_id": [8532, 201826],
            "concept_name": ["FEMALE", "Type 2 diabetes mellitus"],
            "vocabulary_id": ["Gender", "SNOMED"],
            "concept_code": ["F", "44054006"],
        }
    )
)


def cdm(table: str, rows: list[dict]) -> pa.Table:
    schema = CDM_TABLES[table].arrow_schema
    return pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in rows], schema=schema)


def _working() -> pa.Table:
    person = cdm(
        "person",
        [
            {"person_id": 1, "gender_concept_id": 8532, "year_of_birth": 1950, "race_concept_id": 8527},
            {"person_id": 2, "gender_concept_id": 8507, "year_of_birth": 1960, "race_concept_id": 8527},
        ],
    )
    condition = cdm(
        "condition_occurrence",
        [
            {
                "condition_occurrence_id": 1,
                "person_id": 1,
                "condition_concept_id": 201826,
                "condition_start_date": dt.date(2000, 1, 1),
            },
            {
                "condition_occurrence_id": 2,
                "person_id": 2,
                "condition_concept_id": 4,
                "condition_start_date": dt.date(2001, 1, 1),
            },
        ],
    )
    staged = pa.concat_tables(
        [person_events(person, BOOK)[0], table_events("condition_occurrence", condition, BOOK)[0]]
    )
    return finalize_shard(staged, keep=(CONCEPT_COLUMN, PRIORITY_COLUMN))


def test_static_codes_get_null_time_first_and_come_back_at_birth(tmp_path) -> None:
    working = _working()
    rows = meds_rows(working)
    assert rows.schema == MEDS_DATA_SCHEMA
    meds.DataSchema.validate(rows)
    one = [(r["time"], r["code"], r["concept_id"]) for r in rows.to_pylist() if r["subject_id"] == 1]
    assert one == [
        (None, "Gender/F", 8532),
        (None, "RACE/8527", 8527),
        (None, "ETHNICITY/0", None),  # a null concept id stays null
        (dt.datetime(1950, 1, 1), "MEDS_BIRTH", None),
        (dt.datetime(2000, 1, 1), "SNOMED/44054006", 201826),
    ]
    written = write_shard(rows, np.array([0] * 5 + [2] * 5), tmp_path, 3)
    assert [str(p.relative_to(tmp_path)) for p in written] == [
        "data/train/part-00003.parquet",
        "data/held_out/part-00003.parquet",
    ]
    assert pq.read_table(written[1])["subject_id"].to_pylist() == [2] * 5
    back = read_shard(tmp_path, 3, ["subject_id", "time", "code"])
    assert back.num_rows == working.num_rows and back["time"].null_count == 0
    static_one = [r["time"] for r in back.to_pylist() if r["subject_id"] == 1 and r["code"] != "SNOMED/44054006"]
    assert static_one == [dt.datetime(1950, 1, 1)] * 4
    assert read_events(tmp_path).num_rows == 10


def test_a_static_row_of_a_subject_without_birth_is_a_clear_error(tmp_path) -> None:
    rows = meds_rows(_working())
    rows = rows.filter(pa.compute.not_equal(rows["code"], "MEDS_BIRTH"))
    write_shard(rows, np.zeros(rows.num_rows, dtype=np.int64), tmp_path, 0)
    with pytest.raises(ValueError, match="6 static rows of 2 subjects without MEDS_BIRTH"):
        read_shard(tmp_path, 0)


def test_old_layout_is_named(tmp_path) -> None:
    (tmp_path / "events").mkdir()
    with pytest.raises(NotMedsDatasetError, match="old ehrfm layout"):
        read_events(tmp_path)


def test_metadata_files_validate_with_meds(tmp_path) -> None:
    counts = write_metadata(
        tmp_path, BOOK, ["Gender/F", "MEDS_BIRTH", "CONDITION/4"], np.array([1, 2, 3]), np.array([0, 1, 2])
    )
    assert counts == {"codes": 3, "codes_with_concept": 1}
    meds.CodeMetadataSchema.validate(pq.read_table(tmp_path / meds.code_metadata_filepath))
    splits = pq.read_table(tmp_path / meds.subject_splits_filepath)
    meds.SubjectSplitSchema.validate(splits)
    assert splits["split"].to_pylist() == ["train", "tuning", "held_out"]
    dataset = json.loads((tmp_path / meds.dataset_metadata_filepath).read_text())
    meds.DatasetMetadataSchema.validate(dataset)
    assert dataset["etl_name"] == "ehrfm" and dataset["raw_source_id_columns"] == ["concept_id", "visit_id"]


def test_visits_and_unmapped_rows_in_the_book_form_keep_their_concept_ids() -> None:
    book = CodeBook.from_concepts(
        pl.DataFrame({"concept_id": [9201], "vocabulary_id": ["Visit"], "concept_code": ["IP"]})
    )
    visits = cdm(
        "visit_occurrence",
        [
            {
                "visit_occurrence_id": 7,
                "person_id": 1,
                "visit_concept_id": 9201,
                "visit_start_date": dt.date(2000, 1, 1),
                "visit_end_date": dt.date(2000, 1, 3),
            },
            {
                "visit_occurrence_id": 8,
                "person_id": 1,
                "visit_concept_id": 9202,
                "visit_start_date": dt.date(2001, 1, 1),
                "visit_end_date": dt.date(2001, 1, 1),
            },
        ],
    )
    events, _ = table_events("visit_occurrence", visits, book)
    got = sorted(zip(events["code"].to_pylist(), events[CONCEPT_COLUMN].to_pylist(), events["visit_type"].to_pylist()))
    assert got == [
        ("VISIT/9202", 9202, "9202"),
        ("VISIT_END/9202", 9202, "9202"),
        ("VISIT_END/Visit/IP", 9201, "9201"),
        ("Visit/IP", 9201, "9201"),
    ]
    codes = pa.array(["Gender/F", "Race/5", "Ethnicity/Hispanic", "Visit/IP", "VISIT_END/Visit/IP", "SNOMED/1"])
    assert code_priority(codes).tolist() == [1, 2, 3, 4, 8, 5]
    unmapped = cdm(
        "condition_occurrence",
        [
            {
                "condition_occurrence_id": 1,
                "person_id": 1,
                "condition_concept_id": 0,
                "condition_start_date": dt.date(2000, 1, 1),
                "condition_source_value": "E11.9",
            }
        ],
    )
    events, counts = table_events("condition_occurrence", unmapped, book)
    assert events["code"].to_pylist() == ["CONDITION/source/E11.9"] and events[CONCEPT_COLUMN].to_pylist() == [0]
    assert counts.unmapped_coded_by_source == 1
