"""Date plausibility rules, integer date columns, NULL vs 0 concept ids, PRS score sets and build checks.

Each case is built so that the expected count is known row by row (tests/support/omop_tables.py
holds the shared cohort; its drug_exposure rows carry one plausibility violation each).
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ehrfm.omop.cast import IntegerDateError, IntegerDates, convert_column
from ehrfm.omop.events import table_events
from ehrfm.omop.plausibility import Plausibility, day_number, resolve
from ehrfm.omop.spec import CDM_TABLES, ColumnSpec
from ehrfm.omop.validation import NO_DEATH, OmopSchemaError, PersonIndex, validate_batch, validate_omop
from ehrfm.preprocess.config import PreprocessConfig
from ehrfm.prs.readers import PrsFormatError, check_build, read_prs
from tests.support.omop_tables import DRUGS, _cohort, _expected

DATE = ColumnSpec("d", "date", True)
STAMP = ColumnSpec("t", "datetime", False)


def _days(values: pa.Array) -> list[int | None]:
    return pc_days(values).to_pylist()


def pc_days(values: pa.Array) -> pa.Array:
    return values.cast(pa.date32()).cast(pa.int32())


# ---- integer date columns -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cells,expected_days,bad",
    [
        (["20200101", "19991231", None], [18262, 10956, None], [False, False, False]),  # YYYYMMDD text
        (pa.array([20200101, 20201340], pa.int64()), [18262, None], [False, True]),  # month 13: one bad cell
        (["18262", "0", "-365"], [18262, 0, -365], [False, False, False]),  # days since 1970, auto-detected
        (pa.array([18262, 10956], pa.int32()), [18262, 10956], [False, False]),  # stored integers
        (["2020-01-01", "12345"], [18262, None], [False, True]),  # mixed with ISO: read cell by cell
    ],
)
def test_integer_dates_read_when_the_form_is_clear(cells, expected_days, bad) -> None:
    values = cells if isinstance(cells, pa.Array) else pa.array(cells, pa.string())
    out, mask = convert_column(values, DATE, IntegerDates(latest_day=20_000))
    assert _days(out) == expected_days and mask.tolist() == bad


@pytest.mark.parametrize(
    "cells",
    [
        ["20200101", "18262"],  # YYYYMMDD beside days: ambiguous
        ["1577836800", "1577923200"],  # epoch seconds
        ["45000", "45001"],  # spreadsheet serials (2023) read as days would be 2093: beyond the extraction date
        ["0", "0"],  # all zero: a placeholder, not 1970-01-01
    ],
)
def test_integer_dates_refused_when_ambiguous(cells) -> None:
    with pytest.raises(IntegerDateError) as info:
        convert_column(pa.array(cells, pa.string()), DATE, IntegerDates(latest_day=20_000))
    assert info.value.cells == 2


def test_integer_date_modes_and_datetimes() -> None:
    days, bad = convert_column(pa.array(["45000", "99999999"]), DATE, IntegerDates("days_since_1970"))
    assert _days(days) == [45000, None] and bad.tolist() == [False, True]  # 99999999 days: beyond 9999
    ymd, bad = convert_column(pa.array(["18262", "20200101"]), DATE, IntegerDates("yyyymmdd"))
    assert _days(ymd) == [None, 18262] and bad.tolist() == [True, False]
    stamps, bad = convert_column(pa.array([20200102], pa.int64()), STAMP, IntegerDates())
    assert stamps.to_pylist() == [dt.datetime(2020, 1, 2)] and not bad.any()


def test_an_ambiguous_integer_column_refuses_the_file_in_one_line() -> None:
    raw = pa.table(
        {
            "drug_exposure_id": pa.array([1, 2, 3], pa.int64()),
            "person_id": pa.array([1, 1, 1], pa.int64()),
            "drug_concept_id": pa.array([5, 5, 5], pa.int64()),
            "drug_exposure_start_date": pa.array([1_577_836_800, 1_577_923_200, 1_578_009_600], pa.int64()),
            "drug_exposure_end_date": pa.array(["2020-01-01"] * 3),
            "drug_type_concept_id": pa.array([1, 1, 1], pa.int64()),
        }
    )
    with pytest.raises(OmopSchemaError) as info:
        validate_batch("drug_exposure", raw, None, "drug_exposure.parquet")
    message = str(info.value)
    assert "\n" not in message and "1577836800" not in message
    for part in ("drug_exposure", "drug_exposure_start_date", "drug_exposure.parquet", "(3 of 3 rows)"):
        assert part in message


# ---- the plausibility rules -----------------------------------------------------------------------
def test_every_plausibility_reason_is_counted_exactly(tmp_path: Path) -> None:
    report = validate_omop(_cohort(tmp_path / "omop", "csv"), tmp_path / "out")
    drugs = report["tables"]["drug_exposure"]
    assert (
        drugs["by_reason"]
        == _expected(DRUGS)
        == {
            "missing_concept_id": 1,
            "before_1900": 1,
            "after_extraction_date": 2,
            "after_observation_period": 1,
        }
    )
    assert drugs["rows_in"] == len(DRUGS) == drugs["rows_kept"] + drugs["rows_quarantined"]
    assert report["plausibility"]["extraction_date_source"] == "run_date"
    assert report["plausibility"]["extraction_date"] == dt.date.today().isoformat()
    quarantine = pq.read_table(tmp_path / "out" / "quarantine" / "drug_exposure.parquet").to_pylist()
    assert {r["drug_exposure_id"]: r["reason"] for r in quarantine}["4"] == "after_extraction_date"


@pytest.mark.parametrize(
    "cdm_source,config_date,expected,source",
    [
        ("source_release_date,cdm_release_date\n2019-06-30,2019-09-01\n", None, "2019-06-30", "source_release_date"),
        ("cdm_release_date\n20190901\n", dt.date(2001, 1, 1), "2019-09-01", "cdm_release_date"),
        ("source_release_date\n2018-01-01\n2019-02-01\n", None, "2019-02-01", "source_release_date"),  # latest
        ("source_release_date\nnot-a-date\n", dt.date(2001, 1, 1), "2001-01-01", None),  # unparsable: config
        (None, None, dt.date.today().isoformat(), None),
    ],
)
def test_extraction_date_sources(tmp_path: Path, cdm_source, config_date, expected, source) -> None:
    if cdm_source is not None:
        (tmp_path / "CDM_SOURCE.csv").write_text(cdm_source, encoding="utf-8")
    rules = resolve(str(tmp_path), config_date)
    want = f"cdm_source.{source}" if source else ("config" if config_date else "run_date")
    assert rules.report()["extraction_date"] == expected and rules.extraction_source == want


def test_cdm_source_date_moves_the_cut_off(tmp_path: Path) -> None:
    root = _cohort(tmp_path / "omop", "parquet")
    pq.write_table(pa.table({"source_release_date": pa.array([dt.date(2006, 6, 30)])}), root / "cdm_source.parquet")
    report = validate_omop(root)
    assert report["plausibility"]["extraction_date"] == "2006-06-30"
    # the 2006-12-31 and 2007-01-01 rows are now after the extraction date (it comes first in REASONS)
    assert report["tables"]["drug_exposure"]["by_reason"]["after_extraction_date"] == 4
    assert "after_observation_period" not in report["tables"]["drug_exposure"]["by_reason"]


def test_observation_ends_and_the_rules_travel_in_the_person_index() -> None:
    person = pa.table({"person_id": [1, 2, 3], "year_of_birth": [1950, 1960, 1970]})
    person = pa.table(
        {
            c.name: person[c.name] if c.name in person.column_names else pa.nulls(3, c.arrow_type)
            for c in CDM_TABLES["person"].columns
        },
    ).cast(CDM_TABLES["person"].arrow_schema)
    rules = Plausibility(day_number(dt.date(2020, 1, 1)), "config", observation_slack_days=0)
    periods = pa.table(
        {
            "person_id": pa.array([1, 1, 3, 9], pa.int64()),
            "observation_period_end_date": pa.array(
                [dt.date(2001, 1, 1), dt.date(2005, 1, 1), dt.date(2010, 1, 1), dt.date(2011, 1, 1)]
            ),
        }
    )
    index = PersonIndex.from_tables(person, rules=rules).with_observation(periods)
    assert index.observed_until.tolist() == [day_number(dt.date(2005, 1, 1)), NO_DEATH, day_number(dt.date(2010, 1, 1))]
    copy = pickle.loads(pickle.dumps(index))
    assert copy.rules == rules and copy.observed_until.tolist() == index.observed_until.tolist()


def test_preprocess_settings_build_the_rules(tmp_path: Path) -> None:
    cfg = PreprocessConfig.model_validate(
        {"plausibility": {"extraction_date": "2015-03-01", "observation_slack_days": None, "integer_dates": "yyyymmdd"}}
    )
    rules = cfg.plausibility.rules(str(tmp_path))
    assert rules.report() == {
        "extraction_date": "2015-03-01",
        "extraction_date_source": "config",
        "earliest_date": "1900-01-01",
        "observation_slack_days": None,
        "integer_dates": "yyyymmdd",
    }


# ---- NULL vs 0 concept ids ------------------------------------------------------------------------
def test_null_concept_is_quarantined_and_zero_keeps_its_own_code() -> None:
    raw = pa.table(
        {
            "condition_occurrence_id": ["1", "2", "3"],
            "person_id": ["1", "1", "1"],
            "condition_concept_id": ["", "0", "0"],
            "condition_start_date": ["2000-01-01"] * 3,
            "condition_type_concept_id": ["32020"] * 3,
            "condition_source_value": ["E11", "E11", ""],
        }
    )
    kept, quarantine = validate_batch("condition_occurrence", raw, None)
    assert quarantine["reason"].to_pylist() == ["missing_concept_id"]
    events, counts = table_events("condition_occurrence", kept)
    assert events["code"].to_pylist() == ["CONDITION/source/E11", "CONDITION/0"]
    assert counts.null_concept_ids == 0 and counts.unmapped_rows == 2


# ---- PRS score sets and the genome build ---------------------------------------------------------
def _aggregated(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("sampleset\tIID\tPGS\tSUM\n")
        handle.writelines(f"{s}\t{i}\t{p}\t1.0\n" for s, i, p in rows)
    return path


def test_prs_samplesets_with_different_score_sets_are_refused(tmp_path: Path) -> None:
    rows = [("a", f"s{i}", p) for i in range(3) for p in ("P1", "P2")] + [("b", "t1", "P1")] + [("b", "t2", "P1")]
    path = _aggregated(tmp_path / "aggregated_scores.txt.gz", rows)
    with pytest.raises(PrsFormatError) as info:
        read_prs(path)
    assert str(info.value).startswith("aggregated_scores.txt.gz: the PGS score set differs between chunks")
    assert "1 of 2 samplesets (2 of 5 samples)" in str(info.value)
    assert read_prs(path, sampleset="b").pgs_ids == ["P1"]  # one sampleset: consistent


def test_prs_samples_with_crossing_score_sets_are_refused(tmp_path: Path) -> None:
    rows = [("c", f"s{i}", p) for i in range(4) for p in ("P1", "P2")] + [("c", "t1", "P1"), ("c", "t1", "P3")]
    with pytest.raises(PrsFormatError, match=r"1 of 2 score sets \(1 of 5 samples\)"):
        read_prs(_aggregated(tmp_path / "agg.txt.gz", rows))
    # a sample lacking a row is incomplete (counted by validate_prs), not a different chunk
    assert read_prs(_aggregated(tmp_path / "ok.txt.gz", rows[:-1])).pgs_ids == ["P1", "P2"]


def test_prs_build_is_confirmed_warned_or_refused(tmp_path: Path) -> None:
    path = _aggregated(tmp_path / "aggregated_scores.txt.gz", [("c", "s1", "P1")])
    assert check_build(path, None) == ("not_configured", [])
    outcome, warnings = check_build(path, "GRCh38")
    assert outcome == "unconfirmed" and len(warnings) == 1 and "GRCh38" in warnings[0]
    (tmp_path / "match_report.json").write_text(json.dumps({"target_build": "GRCh38"}), encoding="utf-8")
    assert check_build(path, "GRCh38") == ("confirmed", [])
    with pytest.raises(PrsFormatError, match="scored on GRCh38.*configured for GRCh37"):
        check_build(path, "GRCh37")


def test_days_helper_is_exact() -> None:
    assert day_number(dt.date(1970, 1, 2)) == 1 and np.int64(day_number(dt.date(1900, 1, 1))) == -25567
