"""The readers and validator on the real public OMOP samples in shared/data.

Row counts come from each folder's README.txt; the data-quality findings (duplicate ids,
orphan observation periods, an event before birth in GiBleed) are cross-checked with DuckDB,
an engine independent of the reader under test.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb
import pyarrow.compute as pc
import pytest

from ehrfm.omop.validation import find_tables, validate_omop, validate_table

GIBLEED_ROWS = {  # gibleed_omop53/README.txt
    "person": 2694,
    "visit_occurrence": 1037,
    "condition_occurrence": 65332,
    "drug_exposure": 67707,
    "procedure_occurrence": 37409,
    "measurement": 44053,
    "observation": 1477,
    "observation_period": 5343,
    "death": 0,
    "concept": 444,
    "concept_ancestor": 65690,
}
SYNTHEA_ROWS = {  # synthea27nj_omop54/README.txt
    "person": 28,
    "visit_occurrence": 1791,
    "visit_detail": 1791,
    "condition_occurrence": 470,
    "drug_exposure": 883,
    "procedure_occurrence": 1649,
    "measurement": 10040,
    "observation": 8099,
    "death": 3,
    "observation_period": 28,
    "concept": 2294,
    "concept_ancestor": 0,
}


def _assert_account_identity(report: dict) -> None:
    for account in report["tables"].values():
        assert account["rows_in"] == account["rows_kept"] + account["rows_quarantined"]
        assert sum(account["by_reason"].values()) == account["rows_quarantined"]


@pytest.fixture(scope="module")
def gibleed(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return validate_omop(shared_data / "gibleed_omop53", tmp_path_factory.mktemp("gibleed"))


def test_gibleed_cdm53_row_counts(gibleed: dict) -> None:
    _assert_account_identity(gibleed)
    assert {t: a["rows_in"] for t, a in gibleed["tables"].items() if t in GIBLEED_ROWS} == GIBLEED_ROWS
    assert gibleed["persons"] == 2694
    assert gibleed["tables"]["visit_occurrence"]["renamed_cdm53_columns"] == [
        "admitting_source_concept_id",
        "admitting_source_value",
        "discharge_to_concept_id",
        "discharge_to_source_value",
    ]
    for clean in (
        "person",
        "visit_occurrence",
        "condition_occurrence",
        "procedure_occurrence",
        "concept",
        "concept_ancestor",
    ):
        assert gibleed["tables"][clean]["rows_quarantined"] == 0, clean


def test_gibleed_quality_findings_match_duckdb(gibleed: dict, shared_data: Path) -> None:
    root = shared_data / "gibleed_omop53"
    con = duckdb.connect()

    def scalar(sql: str) -> int:
        return con.sql(sql.format(root=root)).fetchall()[0][0]

    for table in ("drug_exposure", "measurement", "observation"):
        repeats = scalar(f"select count(*) - count(distinct {table}_id) from '{{root}}/{table}.csv'")
        assert gibleed["tables"][table]["by_reason"].get("duplicate_primary_key") == repeats
    orphans = scalar(
        "select count(*) from '{root}/observation_period.csv' "
        "where person_id not in (select person_id from '{root}/person.csv')"
    )
    assert gibleed["tables"]["observation_period"]["by_reason"] == {"unknown_person_id": orphans}
    before_birth = scalar(
        "select count(*) from '{root}/drug_exposure.csv' d "
        "join '{root}/person.csv' p using (person_id) where d.drug_exposure_start_date < p.birth_datetime::date"
    )
    assert gibleed["tables"]["drug_exposure"]["by_reason"]["before_birth"] == before_birth
    assert (orphans, before_birth) == (2649, 1)


def test_synthea_csv_and_parquet_agree(shared_data: Path) -> None:
    csv_root = shared_data / "synthea27nj_omop54" / "csv"
    parquet_root = shared_data / "synthea27nj_omop54" / "parquet" / "Synthea27NjParquet"
    from_csv, from_parquet = validate_omop(csv_root), validate_omop(parquet_root)
    for report in (from_csv, from_parquet):
        _assert_account_identity(report)
        assert {t: a["rows_in"] for t, a in report["tables"].items() if t in SYNTHEA_ROWS} == SYNTHEA_ROWS
        assert report["totals"]["rows_quarantined"] == 0
    assert find_tables(str(csv_root))["person"][0].endswith("PERSON.csv")  # upper-case names found
    # the same typed values from csv text and from parquet decimals/timestamps
    csv_meas = validate_table(csv_root, "measurement", None).kept
    parquet_meas = validate_table(parquet_root, "measurement", None).kept
    assert csv_meas.equals(parquet_meas)
    hba1c = csv_meas.filter(pc.equal(csv_meas["measurement_concept_id"], 3004410))
    assert hba1c.num_rows == 195 and len(set(hba1c["person_id"].to_pylist())) == 10
    assert 5.0 < pc.mean(hba1c["value_as_number"]).as_py() < 7.0  # README: mean 6.01 %


def test_ehrdata_edge_cases(shared_data: Path) -> None:
    root = shared_data / "omop_edgecase_fixtures_ehrdata"
    vanilla = validate_omop(root / "vanilla")
    _assert_account_identity(vanilla)
    rows = {t: a["rows_in"] for t, a in vanilla["tables"].items()}
    assert rows == {
        "person": 4,
        "death": 2,
        "observation_period": 3,
        "visit_occurrence": 3,
        "condition_occurrence": 9,
        "drug_exposure": 9,
        "procedure_occurrence": 9,
        "device_exposure": 9,
        "measurement": 9,
        "observation": 9,
        "concept": 0,
    }
    assert vanilla["totals"]["rows_quarantined"] == 0
    # measurement.csv starts with a BOM; row 2's datetime has a no-break space before the time
    measurement = validate_table(root / "vanilla", "measurement", None).kept
    assert measurement["measurement_id"].to_pylist()[:2] == [1, 2]
    assert measurement["measurement_datetime"][1].as_py() == dt.datetime(2100, 1, 1, 13, 0, 0)

    capital = validate_omop(root / "capital_letters")
    assert {t: a["rows_kept"] for t, a in capital["tables"].items()} == {
        "person": 1,
        "observation_period": 1,
        "measurement": 1,
    }
    empty = validate_omop(root / "empty_observation")
    assert empty["tables"]["observation"]["rows_in"] == 0 and empty["tables"]["drug_exposure"]["rows_in"] == 0
    units = validate_table(root / "multiple_units", "observation", None).kept
    same_concept = units.filter(pc.equal(units["observation_concept_id"], 3001062))
    assert sorted(same_concept["unit_concept_id"].to_pylist()) == [8587, 9665]
