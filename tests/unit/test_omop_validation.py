"""OMOP readers and validation on small hand-made files (tests/support/omop_tables.py): every reason code,
csv and parquet (inside Ray Data: tests/integration/test_omop_validation.py)."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from ehrfm.omop.validate import main as validate_main
from ehrfm.omop.validation import (
    CDM_TABLES,
    REASONS,
    OmopSchemaError,
    PersonIndex,
    find_tables,
    first_occurrence_mask,
    read_raw,
    validate_batch,
    validate_omop,
    validate_table,
)
from tests.support.omop_tables import (
    BIG_ID,
    COND_COLS,
    CONDITIONS,
    DEATH,
    DEATH_COLS,
    MEAS_COLS,
    MEASUREMENTS,
    PERSON,
    PERSON_COLS,
    SECRET,
    _cohort,
    _expected,
    _write,
)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_every_reason_code_is_counted_exactly(tmp_path: Path, fmt: str) -> None:
    root = _cohort(tmp_path / "omop", fmt)
    report = validate_omop(root, tmp_path / "out")
    tables = report["tables"]

    assert tables["person"]["rows_kept"] == len(PERSON) and tables["person"]["rows_quarantined"] == 0
    assert tables["death"]["by_reason"] == {"unknown_person_id": 1, "before_birth": 1, "duplicate_primary_key": 1}
    assert tables["death"]["rows_kept"] == 1

    condition = tables["condition_occurrence"]
    assert condition["rows_in"] == len(CONDITIONS)
    assert condition["by_reason"] == _expected(CONDITIONS)
    assert condition["rows_kept"] == sum(r[-1] == "kept" for r in CONDITIONS)
    assert condition["extra_columns"] == ["note_extra"]
    assert tables["measurement"]["by_reason"] == _expected(MEASUREMENTS)

    for account in tables.values():
        assert account["rows_in"] == account["rows_kept"] + account["rows_quarantined"]
        assert sum(account["by_reason"].values()) == account["rows_quarantined"]
    # all reason codes but the csv-only malformed_row were exercised
    seen = {r for a in tables.values() for r in a["by_reason"]}
    assert seen == set(REASONS) - {"malformed_row"}

    # quarantine file: raw values as text, the reason, the source file, extra columns kept
    quarantine = pq.read_table(tmp_path / "out" / "quarantine" / "condition_occurrence.parquet")
    assert quarantine.num_rows == condition["rows_quarantined"]
    assert set(quarantine["source_file"].to_pylist()) == {f"condition_occurrence.{fmt}"}
    by_id = {}
    for row in quarantine.to_pylist():
        by_id.setdefault(row["condition_occurrence_id"], []).append(row["reason"])
    assert by_id["4"] == ["unparsable_date"] and by_id["18"] == ["unknown_person_id"]
    assert by_id["1"] == ["duplicate_primary_key"]
    assert (tmp_path / "out" / "validation_report.json").is_file()
    assert not (tmp_path / "out" / "quarantine" / "person.parquet").exists()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_kept_rows_are_typed_and_exact(tmp_path: Path, fmt: str) -> None:
    root = _cohort(tmp_path / "omop", fmt)
    person = validate_table(root, "person", None).kept
    assert person.schema == CDM_TABLES["person"].arrow_schema  # absent optional columns added as nulls
    assert person["person_id"].to_pylist() == [1, 2, 3, -5, int(BIG_ID), 6]
    assert person["location_id"].null_count == len(PERSON)
    death = validate_table(root, "death", PersonIndex.from_tables(person)).kept
    persons = PersonIndex.from_tables(person, death)
    kept = validate_table(root, "condition_occurrence", persons).kept
    assert kept.schema == CDM_TABLES["condition_occurrence"].arrow_schema
    rows = {r["condition_occurrence_id"]: r for r in kept.to_pylist()}
    assert sorted(rows) == [1, 10, 12, 13, 14, 15, 20]
    assert rows[13]["person_id"] == int(BIG_ID)
    assert rows[14]["condition_start_date"] == dt.date(2005, 1, 1)
    assert rows[15]["condition_start_datetime"] == dt.datetime(2005, 1, 1, 10, 0, 0)
    assert rows[20]["condition_start_date"] == dt.date(2000, 3, 1)
    assert rows[1]["condition_end_date"] == dt.date(2000, 1, 5)
    measurement = validate_table(root, "measurement", persons).kept
    assert measurement["value_as_number"].to_pylist() == [6.5, None, -125.0]


def test_person_index_birth_death_and_pickle(tmp_path: Path) -> None:
    root = _cohort(tmp_path / "omop", "csv")
    person = validate_table(root, "person", None).kept
    index = PersonIndex.from_tables(person)
    death = validate_table(root, "death", index).kept
    index = pickle.loads(pickle.dumps(PersonIndex.from_tables(person, death)))
    found, pos = index.locate(np.array([3, -5, 6, 1234, int(BIG_ID)], dtype=np.int64))
    assert found.tolist() == [True, True, True, False, True]
    epoch = dt.date(1970, 1, 1)
    assert index.birth_day[pos[0]] == (dt.date(1970, 6, 15) - epoch).days
    assert index.birth_day[pos[1]] == (dt.date(1980, 2, 29) - epoch).days
    assert index.birth_day[pos[2]] == (dt.date(1985, 7, 4) - epoch).days
    assert index.birth_day[pos[4]] == (dt.date(1990, 1, 1) - epoch).days
    assert index.death_day[pos[0]] == (dt.date(2000, 1, 1) - epoch).days  # the first death row


def test_malformed_csv_line_is_quarantined(tmp_path: Path) -> None:
    root = tmp_path / "omop"
    _write(root, "person", PERSON_COLS, PERSON, "csv")
    path = root / "observation_period.csv"
    path.write_text(
        "observation_period_id,person_id,observation_period_start_date,observation_period_end_date,"
        "period_type_concept_id\n1,1,2000-01-01,2001-01-01,32817\n2,1,2000-01-01\n3,1,2000-01-01,2001-01-01,32817\n",
        encoding="utf-8",
    )
    report = validate_omop(root, tmp_path / "out")
    account = report["tables"]["observation_period"]
    assert (account["rows_in"], account["rows_kept"], account["by_reason"]) == (3, 2, {"malformed_row": 1})
    quarantine = pq.read_table(tmp_path / "out" / "quarantine" / "observation_period.parquet")
    assert quarantine["malformed_line"].to_pylist() == ["2,1,2000-01-01"]


def test_typed_parquet_inputs(tmp_path: Path) -> None:
    """Stored types: int32 ids, float ids (whole or not), date32, tz-aware timestamps, nulls, NaN."""
    root = tmp_path / "omop"
    root.mkdir()
    pq.write_table(
        pa.table(
            {
                "person_id": pa.array([1, 2], pa.int32()),
                "gender_concept_id": pa.array([8507, 8532], pa.int64()),
                "year_of_birth": pa.array([1950.0, 1960.0], pa.float64()),
                "race_concept_id": pa.array([0, 0], pa.int32()),
                "ethnicity_concept_id": pa.array([0, 0], pa.int32()),
                "birth_datetime": pa.array([None, None], pa.timestamp("ms", tz="UTC")),
            }
        ),
        root / "person.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "visit_occurrence_id": pa.array([10.0, 11.5, 12.0, 13.0, 14.0]),
                "person_id": pa.array([1, 1, None, 2, 2], pa.int64()),
                "visit_concept_id": pa.array([9202] * 5, pa.int32()),
                "visit_start_date": pa.array([dt.date(2000, 1, 1)] * 4 + [None], pa.date32()),
                "visit_end_date": pa.array([dt.datetime(2000, 1, 2, 23, 0)] * 5, pa.timestamp("ns")),
                "visit_type_concept_id": pa.array([32817] * 5, pa.int64()),
                "visit_start_datetime": pa.array([dt.datetime(2000, 1, 1, 9, 30)] * 5, pa.timestamp("s", tz="UTC")),
                "admitting_source_concept_id": pa.array([0, 1, 2, 3, 4], pa.int64()),  # CDM 5.3 name
            }
        ),
        root / "visit_occurrence.parquet",
    )
    report = validate_omop(root)
    account = report["tables"]["visit_occurrence"]
    assert account["by_reason"] == {"missing_person_id": 1, "unparsable_number": 1, "unparsable_date": 1}
    assert account["renamed_cdm53_columns"] == ["admitting_source_concept_id"]
    persons = PersonIndex.from_tables(validate_table(root, "person", None).kept)
    kept = validate_table(root, "visit_occurrence", persons).kept
    assert kept["visit_occurrence_id"].to_pylist() == [10, 13]
    assert kept["visit_end_date"].to_pylist() == [dt.date(2000, 1, 2)] * 2
    assert kept["visit_start_datetime"].to_pylist() == [dt.datetime(2000, 1, 1, 9, 30)] * 2
    assert kept["admitted_from_concept_id"].to_pylist() == [0, 3]


def test_dates_and_numbers_edge_forms() -> None:
    raw = pa.table(
        {
            "concept_id": ["1", "2", "3", "4", "5", "6", "7", "8"],
            "concept_name": ["a"] * 8,
            "domain_id": ["Condition"] * 8,
            "vocabulary_id": ["SNOMED"] * 8,
            "concept_class_id": ["x"] * 8,
            "concept_code": ["c"] * 8,
            "valid_start_date": [
                "19700101",
                "2000-01-01 00:00:00",
                "2000-01-01T12:00:00Z",
                "2000-13-01",
                "2000-01-01\u00a0 ",
                "2024-02-29",
                "2023-02-29",
                "2000-01-01+02:00",
            ],
            "valid_end_date": ["20991231"] * 8,
        }
    )
    kept, quarantine = validate_batch("concept", raw, None)
    assert kept["concept_id"].to_pylist() == [1, 2, 3, 5, 6]
    assert quarantine["concept_id"].to_pylist() == ["4", "7", "8"]
    assert set(quarantine["reason"].to_pylist()) == {"unparsable_date"}
    assert kept["valid_start_date"].to_pylist()[0] == dt.date(1970, 1, 1)
    assert kept["valid_end_date"].to_pylist()[0] == dt.date(2099, 12, 31)


def test_int64_limits_and_signs() -> None:
    raw = pa.table(
        {
            "ancestor_concept_id": [
                "9223372036854775807",
                "9223372036854775808",
                "-9223372036854775808",
                "+7",
                "3.0",
                "3.5",
            ],
            "descendant_concept_id": ["1"] * 6,
            "min_levels_of_separation": ["0"] * 6,
            "max_levels_of_separation": ["0"] * 6,
        }
    )
    kept, quarantine = validate_batch("concept_ancestor", raw, None)
    assert kept["ancestor_concept_id"].to_pylist() == [2**63 - 1, -(2**63), 7, 3]
    assert quarantine["ancestor_concept_id"].to_pylist() == ["9223372036854775808", "3.5"]
    assert quarantine["reason"].to_pylist() == ["unparsable_number"] * 2


def test_duplicates_across_batches_and_composite_keys(tmp_path: Path) -> None:
    root = tmp_path / "omop"
    pairs = [(1, 2), (1, 3), (1, 2), (4, 5), (1, 3), (6, 7), (1, 2)]
    _write(
        root,
        "concept_ancestor",
        ["ancestor_concept_id", "descendant_concept_id", "min_levels_of_separation", "max_levels_of_separation"],
        [(str(a), str(d), "1", "1") for a, d in pairs],
        "csv",
    )
    for batch_rows in (2, 100):
        result = validate_table(root, "concept_ancestor", None, batch_rows=batch_rows)
        assert result.account["by_reason"] == {"duplicate_primary_key": 3}
        kept = list(
            zip(result.kept["ancestor_concept_id"].to_pylist(), result.kept["descendant_concept_id"].to_pylist())
        )
        assert kept == [(1, 2), (1, 3), (4, 5), (6, 7)]
    table = pa.table({"person_id": pa.array([5, None, 5, 6, None], pa.int64())})
    assert first_occurrence_mask(table, "person").tolist() == [True, True, False, True, True]


def test_find_tables_names_formats_and_uris(tmp_path: Path) -> None:
    root = tmp_path / "omop"
    root.mkdir()
    bom = "\ufeff" + ",".join(c.upper() for c in PERSON_COLS) + "\n" + "\n".join(",".join(r) for r in PERSON) + "\n"
    (root / "PERSON.CSV").write_text(bom, encoding="utf-8")
    with gzip.open(root / "Death.csv.gz", "wt", encoding="utf-8") as handle:
        handle.write("person_id,death_date\n3,2000-01-01\n")
    parts = root / "Measurement"
    parts.mkdir()
    _write(parts, "part-00000", MEAS_COLS, MEASUREMENTS[:2], "parquet")
    _write(parts, "part-00001", MEAS_COLS, MEASUREMENTS[2:], "csv")
    (parts / "_SUCCESS").write_text("")
    (root / ".hidden.csv").write_text("x\n")
    (root / "concept_relationship.csv").write_text("a,b\n1,2\n")  # unsupported table: ignored
    (root / "notes.txt").write_text("not a table")

    tables = find_tables(str(root))
    assert sorted(tables) == ["death", "measurement", "person"]
    assert [Path(f).name for f in tables["measurement"]] == ["part-00000.parquet", "part-00001.csv"]
    raw = read_raw(tables["person"], "person")
    assert raw.column_names == PERSON_COLS and raw.num_rows == len(PERSON)
    assert raw["person_id"].type == pa.string()  # untyped read

    report = validate_omop(f"file://{root}")  # a pyarrow filesystem URI
    assert report["tables"]["death"]["rows_kept"] == 1
    assert report["tables"]["measurement"]["rows_in"] == len(MEASUREMENTS)
    assert report["tables"]["measurement"]["files"] == ["part-00000.parquet", "part-00001.csv"]
    assert report["tables"]["measurement"]["by_reason"] == _expected(MEASUREMENTS)

    _write(root, "death", DEATH_COLS, DEATH, "parquet")  # now death.parquet AND Death.csv.gz
    with pytest.raises(OmopSchemaError, match="more than one source"):
        find_tables(str(root))


def test_tab_separated_athena_concept_with_compact_dates(tmp_path: Path) -> None:
    root = tmp_path / "vocab"
    root.mkdir()
    header = (
        "concept_id\tconcept_name\tdomain_id\tvocabulary_id\tconcept_class_id\tstandard_concept\tconcept_code\t"
        "valid_start_date\tvalid_end_date\tinvalid_reason"
    )
    line = '201826\tType 2 diabetes "mellitus"\tCondition\tSNOMED\tClinical Finding\tS\t44054006\t20020131\t20991231\t'
    (root / "CONCEPT.csv").write_text(header + "\n" + line + "\n", encoding="utf-8")
    kept = validate_table(root, "concept", None).kept
    assert kept.num_rows == 1
    assert kept["concept_name"][0].as_py() == 'Type 2 diabetes "mellitus"'
    assert kept["valid_start_date"][0].as_py() == dt.date(2002, 1, 31)


def test_schema_errors_name_table_file_and_column_never_values(tmp_path: Path) -> None:
    root = tmp_path / "omop"
    _write(
        root,
        "person",
        [c for c in PERSON_COLS if c != "year_of_birth"],
        [tuple(v for c, v in zip(PERSON_COLS, r) if c != "year_of_birth") for r in PERSON],
        "csv",
    )
    with pytest.raises(OmopSchemaError) as info:
        validate_omop(root)
    message = str(info.value)
    assert "person" in message and "person.csv" in message and "year_of_birth" in message
    assert SECRET not in message

    bad_type = tmp_path / "typed"
    _write(bad_type, "person", PERSON_COLS, PERSON, "csv")
    pq.write_table(pa.table({"person_id": [1], "death_date": pa.array([True])}), bad_type / "death.parquet")
    with pytest.raises(OmopSchemaError, match=r"death: column death_date in death.parquet is stored as bool"):
        validate_omop(bad_type)

    (tmp_path / "empty").mkdir()
    with pytest.raises(OmopSchemaError, match="no person table"):
        validate_omop(tmp_path / "empty")


def test_validate_batch_accepts_raw_ray_style_batches() -> None:
    """Upper-case names as another reader might deliver them, and a batch without a PersonIndex."""
    raw = pa.table({"PERSON_ID": ["1", "x"], "DEATH_DATE": ["2000-01-01", "2000-01-01"]})
    kept, quarantine = validate_batch("death", raw, None, source_file="part-7.csv")
    assert kept["person_id"].to_pylist() == [1]
    assert quarantine.column_names == ["person_id", "death_date", "reason", "source_file"]
    assert quarantine["source_file"].to_pylist() == ["part-7.csv"]


def test_cli_writes_report_and_returns_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _cohort(tmp_path / "omop", "csv")
    out = tmp_path / "out"
    assert validate_main(["--omop", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "condition_occurrence" in printed and "after_death=1" in printed
    report = json.loads((out / "validation_report.json").read_text())
    assert report["tables"]["condition_occurrence"]["rows_in"] == len(CONDITIONS)
    assert SECRET not in (out / "validation_report.json").read_text() and SECRET not in printed
    (root / "person.csv").write_text("person_id\n1\n")
    assert validate_main(["--omop", str(root), "--out", str(out)]) == 2
    assert "year_of_birth" in capsys.readouterr().err


def test_header_only_and_empty_files(tmp_path: Path) -> None:
    root = tmp_path / "omop"
    _write(root, "person", PERSON_COLS, PERSON, "csv")
    _write(
        root,
        "observation",
        ["observation_id", "person_id", "observation_concept_id", "observation_date", "observation_type_concept_id"],
        [],
        "csv",
    )
    report = validate_omop(root)
    assert report["tables"]["observation"]["rows_in"] == 0
    (root / "death.csv").write_text("")
    with pytest.raises(OmopSchemaError, match="death.csv: death: empty file"):
        validate_omop(root)


def test_read_raw_keeps_csv_text_for_quarantine(tmp_path: Path) -> None:
    root = _cohort(tmp_path / "omop", "csv")
    raw = read_raw(find_tables(str(root))["condition_occurrence"], "condition_occurrence")
    assert raw.num_rows == len(CONDITIONS)
    assert pc.count(raw["person_id"]).as_py() == len(CONDITIONS) - 1  # the empty cell is null
    table = pacsv.read_csv(
        root / "condition_occurrence.csv",
        convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in COND_COLS}),
    )
    assert raw["condition_start_date"].to_pylist()[:4] == table["condition_start_date"].to_pylist()[:4]


def test_person_birth_date_must_be_formable() -> None:
    raw = pa.table(
        {
            "person_id": ["1", "2", "3", "4", "5"],
            "gender_concept_id": ["8507"] * 5,
            "year_of_birth": ["", "1980", "19x0", "", "1980"],
            "month_of_birth": ["", "13", "", "", "2"],
            "day_of_birth": ["", "", "", "", "30"],
            "birth_datetime": ["", "", "", "1975-05-05 00:00:00", ""],
            "race_concept_id": ["0"] * 5,
            "ethnicity_concept_id": ["0"] * 5,
        }
    )
    kept, quarantine = validate_batch("person", raw, None)
    assert kept["person_id"].to_pylist() == [4]  # birth_datetime alone is enough
    assert dict(zip(quarantine["person_id"].to_pylist(), quarantine["reason"].to_pylist())) == {
        "1": "unparsable_date",
        "2": "unparsable_date",
        "3": "unparsable_number",
        "5": "unparsable_date",
    }


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_synthetic_cohort_validates_clean(tmp_path: Path, fmt: str) -> None:
    """The synthetic cohort (several part files per table) passes with zero quarantined rows."""
    from ehrfm.cli import run_command
    from ehrfm.prs.readers import read_prs, read_sample_map, validate_prs

    out = tmp_path / "synthetic"
    assert (
        run_command("synthesize", ["--persons", "300", "--chunk-size", "100", "--format", fmt, "--out", str(out)]) == 0
    )
    report = validate_omop(out / "omop")
    manifest = json.loads((out / "manifest.json").read_text())
    assert {t: a["rows_in"] for t, a in report["tables"].items()} == manifest["rows"]
    assert report["totals"]["rows_quarantined"] == 0
    assert len(report["tables"]["measurement"]["files"]) > 1
    sample_map = read_sample_map(out / "prs" / "sample_map.tsv")
    scores = [
        read_prs(out / "prs" / name) for name in ("aggregated_scores.txt.gz", "scores.sscore", "scores_wide.parquet")
    ]
    for other in scores[1:]:
        assert other.sample_ids.tolist() == scores[0].sample_ids.tolist() and other.pgs_ids == scores[0].pgs_ids
        np.testing.assert_allclose(other.values, scores[0].values, rtol=1e-5, atol=1e-6)
    kept, prs_report = validate_prs(scores[0], sample_map, np.array(_person_ids(out / "omop")))
    assert prs_report["samples_excluded"] == 0 and not any(prs_report["problems"].values())
    assert len(kept) == len(sample_map)


def _person_ids(root: Path) -> list[int]:
    return validate_table(root, "person", None).kept["person_id"].to_pylist()
