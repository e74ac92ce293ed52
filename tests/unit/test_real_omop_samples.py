"""The readers and validator on the real public OMOP samples in shared/data.

Row counts come from each folder's README.txt; the data-quality findings (duplicate ids,
orphan observation periods, an event before birth, events after cdm_source's release date or a
year after the last observation period in GiBleed) are cross-checked with DuckDB, an engine
independent of the reader under test.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb
import pyarrow.compute as pc
import pytest

from ehrfm.omop.plausibility import Plausibility, day_number
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


GIBLEED_STARTS = {
    "visit_occurrence": "visit_start_date",
    "condition_occurrence": "condition_start_date",
    "drug_exposure": "drug_exposure_start_date",
    "procedure_occurrence": "procedure_date",
    "measurement": "measurement_date",
    "observation": "observation_date",
}
_PLAUSIBILITY_SQL = """
with rel as (select max(source_release_date::date) r from '{root}/cdm_source.csv'),
obs as (
    select person_id, max(observation_period_end_date::date) e from '{root}/observation_period.csv'
    where person_id in (select person_id from '{root}/person.csv') group by person_id
),
rows as (
    select t.{table}_id id, t.{start}::date s, obs.e e, p.birth_datetime::date b
    from '{root}/{table}.csv' t join '{root}/person.csv' p using (person_id) left join obs using (person_id)
)
select
    count(*) filter (where s > (select r from rel)),
    count(*) filter (where s <= (select r from rel) and s >= b and e is not null and s > e + 365),
    (select count(*) - count(distinct id) from rows
     where s <= (select r from rel) and s >= b and (e is null or s <= e + 365))
from rows
"""
# the ehrdata fixtures are dated around 2100 and have no cdm_source: an explicit extraction date
EHRDATA_RULES = Plausibility(day_number(dt.date(2200, 1, 1)), "config")


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
    for clean in ("person", "concept", "concept_ancestor"):
        assert gibleed["tables"][clean]["rows_quarantined"] == 0, clean
    assert gibleed["plausibility"]["extraction_date"] == "2019-05-25"  # GiBleed's cdm_source
    assert gibleed["plausibility"]["extraction_date_source"] == "cdm_source.source_release_date"


def test_gibleed_quality_findings_match_duckdb(gibleed: dict, shared_data: Path) -> None:
    root = shared_data / "gibleed_omop53"
    con = duckdb.connect()

    def scalar(sql: str) -> int:
        return con.sql(sql.format(root=root)).fetchall()[0][0]

    for table, start in GIBLEED_STARTS.items():
        # rows after the release date, rows a year after the person's last observation period, and
        # repeated ids among the rows that pass the row-level rules (duplicates are checked last)
        after_release, after_period, repeats = con.sql(
            _PLAUSIBILITY_SQL.format(root=root, table=table, start=start)
        ).fetchall()[0]
        got = gibleed["tables"][table]["by_reason"]
        assert got.get("after_extraction_date", 0) == after_release, table
        assert got.get("after_observation_period", 0) == after_period, table
        assert got.get("duplicate_primary_key", 0) == repeats, table
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
    assert {t: a["by_reason"].get("after_extraction_date", 0) for t, a in gibleed["tables"].items()} == {
        **dict.fromkeys(gibleed["tables"], 0),
        **{"visit_occurrence": 1, "condition_occurrence": 77, "drug_exposure": 113},
        **{"procedure_occurrence": 47, "measurement": 60, "observation": 1},
    }


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
    vanilla = validate_omop(root / "vanilla", rules=EHRDATA_RULES)
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

    capital = validate_omop(root / "capital_letters", rules=EHRDATA_RULES)
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
