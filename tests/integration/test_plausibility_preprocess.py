"""Issue 19 item 3 and 8 on the default preprocess path (shard_files, in-process `main`, the session's Ray).

One tiny cohort holds every plausibility violation at once: drug rows dated 2150 and 9999-12-31,
rows before 1900, rows long after the observation period, rows after cdm_source's release date,
NULL and 0 concept ids, and YYYYMMDD dates stored as integers (parquet) and as text (csv). It is
preprocessed once; the cases below read that one run. The refusals (an integer date column of no
clear form, a PRS file whose chunks hold different score sets) fail before the Ray graph starts.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ehrfm.meds.writer import read_events
from ehrfm.preprocess.job import main as preprocess_main

ARGS = ["progress_bars=false", "tokenizer.min_count=1", "tokenizer.min_values_for_bins=5", "checksum_inputs=false"]
PERSONS = 12
EXTRACTION = dt.date(2011, 6, 30)  # cdm_source.source_release_date
SHORT_FOLLOW_UP = (1, 2, 3)  # observation ends 2005-12-31 (others: 2010-12-31)


def _ymd(day: str) -> int:
    return int(day.replace("-", ""))


# drug_exposure (parquet, dates as YYYYMMDD integers): (person, concept, source value, start, reason)
DRUGS = [(p, 1503297, "metformin", f"2004-0{p % 9 + 1}-15", "kept") for p in range(1, PERSONS + 1)] + [
    (4, 1503297, "metformin", "2150-01-01", "after_extraction_date"),
    (5, 1503297, "metformin", "2150-07-04", "after_extraction_date"),
    (6, 1503297, "metformin", "9999-12-31", "after_extraction_date"),
    (7, 1503297, "metformin", "9999-12-31", "after_extraction_date"),
    (8, 1503297, "metformin", "1850-01-01", "before_1900"),
    (1, 1503297, "metformin", "2008-03-01", "after_observation_period"),  # 2005-12-31 + 365 < 2008
    (2, 1503297, "metformin", "2007-01-01", "after_observation_period"),
    (3, 1503297, "metformin", "2006-12-31", "kept"),  # exactly 365 days after: kept
    (9, None, "metformin", "2004-02-01", "missing_concept_id"),  # NULL concept id
    (10, None, "", "2004-02-01", "missing_concept_id"),
    (9, 0, "local-drug-x", "2004-03-01", "kept"),  # 0: unmapped, coded by its source value
    (10, 0, "local-drug-x", "2004-03-01", "kept"),
    (11, 0, "", "2004-03-01", "kept"),  # 0 without a source value: DRUG/0
]
# condition_occurrence (csv, ISO dates): (person, start, reason)
CONDITIONS = [(p, f"2003-0{p % 9 + 1}-10", "kept") for p in range(1, PERSONS + 1)] + [
    (4, "1899-12-31", "before_1900"),
    (5, "2011-09-01", "after_extraction_date"),  # within the observation slack, after the release date
    (6, "2011-06-30", "kept"),  # the release date itself
    (1, "2009-01-01", "after_observation_period"),
]
MEASUREMENT_ROWS = 24  # csv, dates as YYYYMMDD text: all kept


def _csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    lines = [",".join(header)] + [",".join("" if v is None else str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _cohort(omop: Path) -> Path:
    omop.mkdir(parents=True)
    _csv(
        omop / "person.csv",
        ["person_id", "gender_concept_id", "year_of_birth", "race_concept_id", "ethnicity_concept_id"],
        [[p, 8507, 1940 + p, 0, 0] for p in range(1, PERSONS + 1)],
    )
    _csv(omop / "cdm_source.csv", ["cdm_source_name", "source_release_date"], [["tiny", EXTRACTION.isoformat()]])
    _csv(
        omop / "observation_period.csv",
        [
            "observation_period_id",
            "person_id",
            "observation_period_start_date",
            "observation_period_end_date",
            "period_type_concept_id",
        ],
        [
            [p, p, "1995-01-01", "2005-12-31" if p in SHORT_FOLLOW_UP else "2010-12-31", 32817]
            for p in range(1, PERSONS + 1)
        ],
    )
    starts = [_ymd(d[3]) for d in DRUGS]
    pq.write_table(
        pa.table(
            {
                "drug_exposure_id": pa.array(range(1, len(DRUGS) + 1), pa.int64()),
                "person_id": pa.array([d[0] for d in DRUGS], pa.int64()),
                "drug_concept_id": pa.array([d[1] for d in DRUGS], pa.int64()),
                "drug_exposure_start_date": pa.array(starts, pa.int64()),
                "drug_exposure_end_date": pa.array(starts, pa.int64()),
                "drug_type_concept_id": pa.array([38000177] * len(DRUGS), pa.int64()),
                "drug_source_value": pa.array([d[2] or None for d in DRUGS], pa.string()),
            }
        ),
        omop / "drug_exposure.parquet",
    )
    _csv(
        omop / "condition_occurrence.csv",
        [
            "condition_occurrence_id",
            "person_id",
            "condition_concept_id",
            "condition_start_date",
            "condition_type_concept_id",
        ],
        [[i, p, 201826, day, 32020] for i, (p, day, _) in enumerate(CONDITIONS, start=1)],
    )
    _csv(
        omop / "measurement.csv",
        [
            "measurement_id",
            "person_id",
            "measurement_concept_id",
            "measurement_date",
            "measurement_type_concept_id",
            "value_as_number",
        ],
        [
            [i, i % PERSONS + 1, 3004410, f"2006{i % 12 + 1:02d}15", 32856, 5 + i % 7]
            for i in range(1, MEASUREMENT_ROWS + 1)
        ],
    )
    return omop


def _prs(path: Path, persons: range, pgs_of) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("sampleset\tIID\tPGS\tSUM\tDENOM\tAVG\n")
        for p in persons:
            for pgs in pgs_of(p):
                handle.write(f"{'a' if p <= 6 else 'b'}\t{p}\t{pgs}\t{p / 10}\t10\t{p / 100}\n")
    return path


def _expected(rows: list[tuple], reason_index: int = -1) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        if row[reason_index] != "kept":
            counts[row[reason_index]] = counts.get(row[reason_index], 0) + 1
    return counts


@pytest.fixture(scope="module")
def run(ray_cluster, tmp_path_factory) -> dict:
    """The one preprocess run every case reads (default shard_files strategy, a configured build)."""
    root = tmp_path_factory.mktemp("plausibility")
    omop = _cohort(root / "omop")
    prs = _prs(root / "aggregated_scores.txt.gz", range(1, PERSONS + 1), lambda p: ("PGS1", "PGS2"))
    out = root / "out"
    code = preprocess_main(["--omop", str(omop), "--prs", str(prs), "--out", str(out), *ARGS, "prs.build=GRCh38"])
    assert code == 0
    events = read_events(out)  # the MEDS dataset's data/<split>/ files, static codes placed at birth
    quarantine = {}
    for table in ("drug_exposure", "condition_occurrence"):
        parts = [pq.read_table(f) for f in sorted((out / "quarantine" / table).glob("*.parquet"))]
        quarantine[table] = pa.concat_tables(parts, promote_options="default") if parts else None
    return {"report": json.loads((out / "report.json").read_text()), "events": events, "quarantine": quarantine}


CASES = [
    ("drug_exposure", "after_extraction_date", 4),  # 2150 (2) and 9999-12-31 (2)
    ("drug_exposure", "before_1900", 1),
    ("drug_exposure", "after_observation_period", 2),
    ("drug_exposure", "missing_concept_id", 2),
    ("condition_occurrence", "before_1900", 1),
    ("condition_occurrence", "after_extraction_date", 1),
    ("condition_occurrence", "after_observation_period", 1),
    ("measurement", "unparsable_date", 0),  # YYYYMMDD text dates parse
    ("drug_exposure", "unparsable_date", 0),  # YYYYMMDD integer dates parse
]


@pytest.mark.ray
@pytest.mark.parametrize("table,reason,count", CASES, ids=[f"{t}-{r}" for t, r, _ in CASES])
def test_each_reason_is_counted_exactly(run: dict, table: str, reason: str, count: int) -> None:
    account = run["report"]["tables"][table]
    assert account["by_reason"].get(reason, 0) == count
    written = run["quarantine"].get(table)
    if written is not None:
        assert written["reason"].to_pylist().count(reason) == count


@pytest.mark.ray
@pytest.mark.parametrize(
    "table,rows,expected",
    [
        ("drug_exposure", DRUGS, _expected(DRUGS)),
        ("condition_occurrence", CONDITIONS, _expected(CONDITIONS)),
        ("measurement", [()] * MEASUREMENT_ROWS, {}),
        ("observation_period", [()] * PERSONS, {}),
    ],
    ids=["drug_exposure", "condition_occurrence", "measurement", "observation_period"],
)
def test_rows_in_equal_kept_plus_quarantined(run: dict, table: str, rows: list, expected: dict) -> None:
    account = run["report"]["tables"][table]
    assert account["rows_in"] == len(rows) == account["rows_kept"] + account["rows_quarantined"]
    assert account["by_reason"] == expected and sum(expected.values()) == account["rows_quarantined"]


@pytest.mark.ray
def test_no_kept_event_after_the_extraction_date(run: dict) -> None:
    rules = run["report"]["plausibility"]
    assert rules["extraction_date"] == EXTRACTION.isoformat()
    assert rules["extraction_date_source"] == "cdm_source.source_release_date"
    times = run["events"]["time"]
    latest = pc.max(times).as_py()
    assert latest is not None and latest < dt.datetime.combine(EXTRACTION + dt.timedelta(days=1), dt.time())
    assert pc.min(times).as_py() >= dt.datetime(1900, 1, 1)


@pytest.mark.ray
def test_null_and_zero_concept_ids_stay_distinct(run: dict) -> None:
    codes = run["events"]["code"].to_pylist()
    # NULL rows (2) are quarantined; concept 0 keeps its source value, or DRUG/0 without one
    assert codes.count("DRUG/source/local-drug-x") == 2 and codes.count("DRUG/0") == 1
    mapping = run["report"]["tables"]["drug_exposure"]["mapping"]
    assert mapping["null_concept_ids"] == 0 and mapping["unmapped_rows"] == 3


@pytest.mark.ray
def test_unconfirmed_prs_build_is_a_warning(run: dict) -> None:
    prs = run["report"]["prs"]
    assert prs["build"] == "GRCh38" and prs["build_check"] == "unconfirmed"
    assert len(prs["warnings"]) == 1 and "aggregated_scores.txt.gz" in prs["warnings"][0]


def _refused(argv: list[str], capsys) -> str:
    assert preprocess_main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ehrfm preprocess: ")]
    assert len(err) == 1
    return err[0]


@pytest.mark.ray
def test_integer_dates_of_no_clear_form_are_refused(ray_cluster, tmp_path: Path, capsys) -> None:
    omop = _cohort(tmp_path / "omop")
    _csv(omop / "death.csv", ["person_id", "death_date"], [[1, 1577836800], [2, 1577923200]])  # epoch seconds
    line = _refused(["--omop", str(omop), "--out", str(tmp_path / "out"), *ARGS], capsys)
    assert "death.csv" in line and "death.death_date" in line and "(2 of 2 rows)" in line
    assert "1577836800" not in line and not (tmp_path / "out").exists()


@pytest.mark.ray
def test_prs_chunks_with_different_score_sets_are_refused(ray_cluster, tmp_path: Path, capsys) -> None:
    omop = _cohort(tmp_path / "omop")
    prs = _prs(
        tmp_path / "mixed.txt.gz", range(1, PERSONS + 1), lambda p: ("PGS1", "PGS2") if p <= 6 else ("PGS1", "PGS3")
    )
    line = _refused(["--omop", str(omop), "--prs", str(prs), "--out", str(tmp_path / "out"), *ARGS], capsys)
    assert "mixed.txt.gz" in line and "1 of 2 samplesets (6 of 12 samples)" in line
