"""Small hand-made OMOP tables for tests/{unit,integration}/test_omop_validation.py: each bad row is built to fail
exactly one check (or several, to test the priority), so the expected account is known row by row."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

BIG_ID = "9007199254740993"  # 2^53 + 1: not representable as float64, must stay exact
SECRET = "SECRET-VALUE-77"  # a cell value that must never appear in messages or reports


PERSON = [
    # person_id, gender, year, month, day, birth_datetime, race, ethnicity, person_source_value
    ("1", "8507", "1950", "1", "1", "", "0", "0", SECRET),
    ("2", "8532", "1960", "", "", "", "0", "0", ""),
    ("3", "8507", "1970", "6", "15", "", "0", "0", ""),
    ("-5", "8532", "1980", "2", "29", "", "0", "0", ""),
    (BIG_ID, "8507", "1990", "", "", "", "0", "0", ""),
    ("6", "8532", "1901", "", "", "1985-07-04 08:30:00", "0", "0", ""),  # birth_datetime wins
]
PERSON_COLS = [
    "person_id",
    "gender_concept_id",
    "year_of_birth",
    "month_of_birth",
    "day_of_birth",
    "birth_datetime",
    "race_concept_id",
    "ethnicity_concept_id",
    "person_source_value",
]
DEATH_COLS = ["person_id", "death_date"]


DEATH = [
    ("3", "2000-01-01"),
    ("3", "2001-01-01"),  # duplicate_primary_key: a second death for person 3
    ("99", "2000-01-01"),  # unknown_person_id
    ("2", "1959-12-31"),  # before_birth: death before birth (1960-01-01)
]
COND_COLS = [
    "condition_occurrence_id",
    "person_id",
    "condition_concept_id",
    "condition_start_date",
    "condition_start_datetime",
    "condition_end_date",
    "condition_type_concept_id",
    "note_extra",
]


# id, person, concept, start, start_datetime, end, expected outcome
CONDITIONS = [
    ("1", "1", "201826", "2000-01-01", "", "2000-01-05", "kept"),
    ("2", "", "201826", "2000-01-01", "", "", "missing_person_id"),
    ("3", "42", "201826", "2000-01-01", "", "", "unknown_person_id"),
    ("4", "1", "201826", "not-a-date", "", "", "unparsable_date"),
    ("5", "1", "201826", "", "", "", "unparsable_date"),  # empty required date
    ("6", "1", "abc", "2000-01-01", "", "", "unparsable_number"),
    ("7", "1", "201826", "2000-02-01", "", "2000-01-01", "end_before_start"),
    ("8", "1", "201826", "1949-12-31", "", "", "before_birth"),
    ("9", "3", "201826", "2000-02-01", "", "", "after_death"),  # 31 days after death
    ("10", "3", "201826", "2000-01-31", "", "", "kept"),  # exactly 30 days after: allowed
    ("1", "2", "201826", "2000-01-01", "", "", "duplicate_primary_key"),
    ("12", "-5", "201826", "1980-02-29", "", "", "kept"),  # birth day itself, negative id
    ("13", BIG_ID, "201826", "1990-01-01", "", "", "kept"),
    ("14", "2", "201826", "20050101", "", "", "kept"),  # compact date
    ("15", "2", "201826", "2005-01-01T10:00:00", "2005-01-01T10:00:00", "", "kept"),
    ("16", "2", "201826", "2005-02-30", "", "", "unparsable_date"),  # no 30 February
    ("17", "2", "201826", "2005-01-01", "garbage", "", "unparsable_date"),  # optional datetime
    ("18", "42", "201826", "bad", "", "", "unknown_person_id"),  # two faults: the first reason wins
    ("19", "6", "201826", "1985-07-03", "", "", "before_birth"),  # birth_datetime 1985-07-04
    ("20", "1", "201826", " 2000-03-01 ", "", "", "kept"),  # surrounding whitespace
]
DRUG_COLS = [
    "drug_exposure_id",
    "person_id",
    "drug_concept_id",
    "drug_exposure_start_date",
    "drug_exposure_end_date",
    "drug_type_concept_id",
]
# the plausibility reasons (omop.plausibility); the extraction date is the run date (no cdm_source)
DRUGS = [
    ("1", "1", "", "2000-01-01", "2000-01-02", "38000177", "missing_concept_id"),  # NULL: a CDM violation
    ("2", "1", "0", "2000-01-01", "2000-01-02", "38000177", "kept"),  # 0 = "no matching concept": kept
    ("3", "1", "1503297", "1899-12-31", "1899-12-31", "38000177", "before_1900"),  # before birth too: first wins
    ("4", "2", "1503297", "9999-12-31", "9999-12-31", "38000177", "after_extraction_date"),
    ("5", "2", "1503297", "2150-06-01", "2150-06-30", "38000177", "after_extraction_date"),
    ("6", "1", "1503297", "2007-01-01", "2007-01-02", "38000177", "after_observation_period"),  # 2005-12-31 + 366
    ("7", "1", "1503297", "2006-12-31", "2007-01-02", "38000177", "kept"),  # exactly 365 days after: allowed
]
OBS_COLS = [
    "observation_period_id",
    "person_id",
    "observation_period_start_date",
    "observation_period_end_date",
    "period_type_concept_id",
]
OBSERVATION_PERIODS = [  # person 1 only: the other persons' rows are not checked against a period
    ("1", "1", "1995-01-01", "2001-12-31", "32817", "kept"),
    ("2", "1", "2003-01-01", "2005-12-31", "32817", "kept"),  # the last period's end counts
]
MEAS_COLS = [
    "measurement_id",
    "person_id",
    "measurement_concept_id",
    "measurement_date",
    "measurement_type_concept_id",
    "value_as_number",
]
MEASUREMENTS = [
    ("1", "1", "3004410", "2001-01-01", "32817", "6.5", "kept"),
    ("2", "1", "3004410", "2001-01-01", "32817", "NaN", "unparsable_number"),
    ("3", "1", "3004410", "2001-01-01", "32817", "1e999", "unparsable_number"),  # overflows to inf
    ("4", "1", "3004410", "2001-01-01", "32817", "7,5", "unparsable_number"),
    ("5", "1", "3004410", "2001-01-01", "32817", "", "kept"),  # optional value absent
    ("6", "1", "3004410", "2001-01-01", "32817", "-1.25e2", "kept"),
]


def _expected(rows: list[tuple]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        if row[-1] != "kept":
            counts[row[-1]] = counts.get(row[-1], 0) + 1
    return counts


def _write(directory: Path, name: str, columns: list[str], rows: list[tuple], fmt: str) -> Path:
    """Write string cells as csv (empty = missing) or as an all-string parquet file."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [row[: len(columns)] for row in rows]
    if fmt == "parquet":
        table = pa.table(
            {c: pa.array([r[i] if r[i] != "" else None for r in rows], pa.string()) for i, c in enumerate(columns)}
        )
        path = directory / f"{name}.parquet"
        pq.write_table(table, path)
        return path
    path = directory / f"{name}.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def _cohort(root: Path, fmt: str) -> Path:
    _write(root, "person", PERSON_COLS, PERSON, fmt)
    _write(root, "death", DEATH_COLS, DEATH, fmt)
    _write(root, "condition_occurrence", COND_COLS, [r[:6] + ("32020", "x") for r in CONDITIONS], fmt)
    _write(root, "measurement", MEAS_COLS, MEASUREMENTS, fmt)
    _write(root, "observation_period", OBS_COLS, OBSERVATION_PERIODS, fmt)
    _write(root, "drug_exposure", DRUG_COLS, DRUGS, fmt)
    return root
