"""PRS readers (pgsc_calc aggregated, plink2 .sscore, wide parquet) and validate_prs problem counts.

The .sscore tests read the real plink2 outputs in shared/data; the error cases use small files
written here, each built so that the expected count of every problem is known.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ehrfm.omop.validate import main as validate_main
from ehrfm.prs.readers import (
    PrsFormatError,
    PRSScores,
    detect_format,
    read_pcs,
    read_prs,
    read_sample_map,
    validate_prs,
)

CINECA = "prs_pgsc_calc_cineca_chr22/expected_outputs"


def _plain_columns(path: Path) -> dict[str, list[str]]:
    """The file's columns read with the csv module: an independent reference for the reader."""
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    header = [h.lstrip("#") for h in rows[0]]
    return {name: [r[i] for r in rows[1:]] for i, name in enumerate(header)}


def test_real_sscore_single_score_without_fid(shared_data: Path) -> None:
    path = shared_data / CINECA / "cineca_22_additive_0.sscore"
    assert detect_format(path) == "sscore"
    sums = read_prs(path)
    avgs = read_prs(path, column="AVG")
    reference = _plain_columns(path)
    assert sums.pgs_ids == ["PGS001229_22"] and sums.values.shape == (2504, 1)
    assert sums.sample_ids[:2].tolist() == ["HG00096", "HG00097"]
    assert sums.sample_ids.tolist() == reference["IID"]
    np.testing.assert_allclose(sums.values[:, 0], np.array(reference["PGS001229_22_SUM"], dtype=float), rtol=1e-6)
    denom = np.array(reference["DENOM"], dtype=float)
    # plink2: AVG = SUM / DENOM (both printed to 6 significant digits); DENOM != ALLELE_CT for the
    # 41 samples with missing genotypes, so this also checks that the right columns were picked
    assert (denom != np.array(reference["ALLELE_CT"], dtype=float)).sum() == 41
    np.testing.assert_allclose(avgs.values[:, 0] * denom, sums.values[:, 0], rtol=2e-5, atol=1e-6)
    assert sums.present.all() and sums.unparsable_values == 0


def test_real_sscore_two_scores_with_fid(shared_data: Path) -> None:
    one = read_prs(shared_data / CINECA / "cineca_22_additive_0.sscore")
    two = read_prs(shared_data / CINECA / "cineca_22_additive_0_PGS001229_and_duplicatetest.sscore")
    assert two.pgs_ids == ["PGS001229", "duplicatetest"]
    assert two.sample_ids.tolist() == one.sample_ids.tolist()
    np.testing.assert_array_equal(two.values[:, 0], one.values[:, 0])  # same score, same samples
    assert two.values[0, 1] == np.float32(0.0437121)
    mapping = {sample: 1000 + i for i, sample in enumerate(two.sample_ids.tolist())}
    kept, report = validate_prs(two, mapping, np.arange(1000, 1000 + 2504))
    assert report["samples_kept"] == 2504 and report["samples_excluded"] == 0
    assert kept.person_ids[:3].tolist() == [1000, 1001, 1002]


def _write_aggregated(path: Path, rows: list[tuple[str, ...]]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("sampleset\tIID\tPGS\tSUM\tDENOM\tAVG\n")
        for row in rows:
            handle.write("\t".join(row) + "\n")
    return path


AGGREGATED = [
    ("cohort", "s1", "PGS000001", "1.5", "10", "0.15"),
    ("cohort", "s1", "PGS000002", "-2.0", "10", "-0.2"),
    ("cohort", "s2", "PGS000001", "inf", "10", "inf"),  # infinite score beside a finite one
    ("cohort", "s2", "PGS000002", "4.0", "10", "0.4"),
    ("cohort", "s3", "PGS000001", "0.25", "10", "0.025"),  # s3 lacks PGS000002: incomplete set
    ("cohort", "s1", "PGS000001", "9.0", "10", "0.9"),  # s1 again: duplicate IID
    ("cohort", "s4", "PGS000001", "oops", "10", "x"),  # unparsable: counted, then missing
    ("cohort", "s4", "PGS000002", "3", "10", "0.3"),
    ("cohort", "s5", "PGS000001", "1", "10", "0.1"),  # s5 is not in the sample map
    ("cohort", "s5", "PGS000002", "1", "10", "0.1"),
    ("cohort", "s6", "PGS000001", "1", "10", "0.1"),  # s6 maps to a person not in the person table
    ("cohort", "s6", "PGS000002", "1", "10", "0.1"),
    ("cohort", "s7", "PGS000001", "2", "10", "0.2"),  # s7 maps to the same person as s1
    ("cohort", "s7", "PGS000002", "2", "10", "0.2"),
    ("cohort", "s8", "PGS000001", "NaN", "10", "NaN"),  # no finite score at all
    ("cohort", "s8", "PGS000002", "-inf", "10", "-inf"),
    ("reference", "r1", "PGS000001", "5", "10", "0.5"),
    ("reference", "r1", "PGS000002", "5", "10", "0.5"),
]
SAMPLE_MAP = {"s1": 11, "s2": 12, "s3": 13, "s4": 14, "s6": 99, "s7": 11, "s8": 16, "r1": 15}
PERSONS = np.array([11, 12, 13, 14, 15, 16], dtype=np.int64)


def test_pgsc_calc_long_format_keeps_every_row(tmp_path: Path) -> None:
    path = _write_aggregated(tmp_path / "aggregated_scores.txt.gz", AGGREGATED)
    assert detect_format(path) == "pgsc_calc"
    scores = read_prs(path)
    assert scores.pgs_ids == ["PGS000001", "PGS000002"]
    # s1 appears twice (the repeated PGS000001 row opens a second s1 row), nothing overwritten
    assert scores.sample_ids.tolist() == ["s1", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "r1"]
    np.testing.assert_array_equal(scores.values[0], [1.5, -2.0])
    assert scores.values[1, 0] == 9.0 and not scores.present[1, 1]
    assert np.isposinf(scores.values[2, 0]) and scores.values[2, 1] == 4.0 and scores.present[2].all()
    assert scores.present[3].tolist() == [True, False]
    assert scores.present[4].tolist() == [False, True] and scores.unparsable_values == 1
    assert np.isnan(scores.values[8, 0]) and np.isneginf(scores.values[8, 1]) and scores.present[8].all()
    avg = read_prs(path, column="AVG", sampleset="reference")
    assert avg.sample_ids.tolist() == ["r1"] and avg.values.tolist() == [[0.5, 0.5]]


def test_validate_prs_reports_every_problem(tmp_path: Path) -> None:
    scores = read_prs(_write_aggregated(tmp_path / "agg.txt.gz", AGGREGATED))
    problems = tmp_path / "quarantine" / "prs_samples.parquet"
    kept, report = validate_prs(scores, SAMPLE_MAP, PERSONS, problems_out=problems)
    assert report["samples_in"] == 10
    assert report["excluded_by_reason"] == {
        "duplicate_sample_id": 1,
        "unmapped_sample": 1,
        "unknown_person_id": 1,
        "duplicate_person_id": 1,
        "no_scores": 1,
    }
    assert report["samples_kept"] == 5 and report["samples_in"] == report["samples_kept"] + report["samples_excluded"]
    assert report["problems"] == {
        "duplicate_sample_rows": 1,
        "nonfinite_values": 3,
        "samples_with_nonfinite": 2,
        "unparsable_values": 1,
        "samples_with_incomplete_pgs_set": 3,
        "missing_cells": 3,
    }
    assert report["persons"] == 6 and report["persons_with_prs"] == 5 and report["persons_without_prs"] == 1
    assert kept.sample_ids.tolist() == ["s1", "s2", "s3", "s4", "r1"]
    assert kept.person_ids.tolist() == [11, 12, 13, 14, 15]
    assert np.isnan(kept.values[1, 0]) and kept.values[1, 1] == 4.0  # infinity became missing
    assert np.isnan(kept.values[3, 0]) and kept.values[3, 1] == 3.0  # the unparsable cell is missing
    table = pq.read_table(problems).to_pylist()
    assert {"sample_id": "s5", "status": "excluded", "problem": "unmapped_sample"} in table
    assert {"sample_id": "s8", "status": "excluded", "problem": "no_scores"} in table
    assert {"sample_id": "s2", "status": "kept", "problem": "nonfinite_values"} in table
    assert {"sample_id": "s4", "status": "kept", "problem": "incomplete_pgs_set"} in table
    assert len(table) == 5 + 1 + 2  # five exclusions, one non-finite, two incomplete (s3, s4)


def test_sample_without_any_finite_score_is_excluded() -> None:
    scores = PRSScores(np.array(["a", "b"]), ["P1", "P2"], np.array([[np.nan, np.inf], [1.0, 2.0]]))
    kept, report = validate_prs(scores, {"a": 1, "b": 2}, np.array([1, 2]))
    assert report["excluded_by_reason"] == {"no_scores": 1} and kept.person_ids.tolist() == [2]


def test_wide_parquet_and_ids_without_a_map(tmp_path: Path) -> None:
    path = tmp_path / "scores_wide.parquet"
    pq.write_table(
        pa.table(
            {
                "sample_id": ["7", "8", "x9"],
                "PGS000001": pa.array([0.5, None, 1.5]),
                "PGS000002": pa.array([1.0, float("nan"), 2.0]),
            }
        ),
        path,
    )
    assert detect_format(path) == "wide"
    scores = read_prs(path)
    assert scores.pgs_ids == ["PGS000001", "PGS000002"]
    assert scores.present.tolist() == [[True, True], [False, True], [True, True]]
    kept, report = validate_prs(scores, None, np.array([7, 8]))  # sample ids are the person ids
    assert report["excluded_by_reason"] == {"unmapped_sample": 1, "no_scores": 1}
    assert kept.person_ids.tolist() == [7]
    assert report["problems"]["samples_with_incomplete_pgs_set"] == 1


def test_sscore_duplicates_and_avg_only_files(tmp_path: Path) -> None:
    path = tmp_path / "scores.sscore"
    path.write_text(
        "#IID\tALLELE_CT\tNAMED_ALLELE_DOSAGE_SUM\tSCORE1_AVG\na\t10\t5\t0.1\nb\t10\t5\t0.2\na\t10\t5\t0.3\n"
    )
    with pytest.raises(PrsFormatError, match=r"scores.sscore: no score column ending in _SUM"):
        read_prs(path)
    scores = read_prs(path, column="AVG")
    assert scores.pgs_ids == ["SCORE1"] and scores.sample_ids.tolist() == ["a", "b", "a"]
    kept, report = validate_prs(scores, {"a": 1, "b": 2}, [1, 2])
    assert report["excluded_by_reason"] == {"duplicate_sample_id": 1}
    assert kept.values[:, 0].tolist() == pytest.approx([0.1, 0.2])


def test_sample_map_and_pcs(tmp_path: Path) -> None:
    good = tmp_path / "sample_map.tsv"
    good.write_text("sample_id\tperson_id\nS-001\t1\nS-002\t-2\nS-001\t1\n")
    assert read_sample_map(good) == {"S-001": 1, "S-002": -2}  # a repeated identical pair is harmless
    pcs = tmp_path / "pcs.tsv"
    pcs.write_text("sample_id\tPC2\tPC1\nS-001\t0.2\t0.1\nS-002\t-0.5\t1e-3\n")
    ids, values = read_pcs(pcs)
    assert ids.tolist() == ["S-001", "S-002"] and values.dtype == np.float32
    np.testing.assert_allclose(values, [[0.1, 0.2], [1e-3, -0.5]])  # PC columns in numeric order


BAD_FILES = [  # (file name, content, reader, expected message); "P7"/"s2x" must never be echoed
    (
        "conflict.tsv",
        "sample_id\tperson_id\nS-001\t1\nS-001\t2\nS-003\t3\nS-003\t4\n",
        read_sample_map,
        "conflict.tsv: 2 sample id",
    ),
    ("bad.tsv", "sample_id\tperson_id\nS-001\tP7\n", read_sample_map, "person_id has 1 value"),
    ("ref.eigenvec", "#FID\tIID\tPC1\tPC2\nf\tS-001\t0.1\tNA\n", read_pcs, "1 PC value"),
    ("scores.txt", "foo\tbar\n1\t2\n", read_prs, "not a recognised PRS format"),
    ("agg.txt", "sampleset\tIID\tPGS\tSUM\ncohort\ts1\tP1\t1\ncohort\ts2x\n", read_prs, "agg.txt: 1 line"),
]


@pytest.mark.parametrize(("name", "content", "reader", "message"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_raise_with_counts_not_values(tmp_path: Path, name: str, content: str, reader, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PrsFormatError, match=message) as info:
        reader(path)
    assert "P7" not in str(info.value) and "s2x" not in str(info.value)


def test_cli_with_prs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    omop = tmp_path / "omop"
    omop.mkdir()
    (omop / "person.csv").write_text(
        "person_id,gender_concept_id,year_of_birth,race_concept_id,ethnicity_concept_id\n"
        + "".join(f"{p},8507,1960,0,0\n" for p in PERSONS)
    )
    prs = _write_aggregated(tmp_path / "aggregated_scores.txt.gz", AGGREGATED)
    sample_map = tmp_path / "sample_map.tsv"
    sample_map.write_text("sample_id\tperson_id\n" + "".join(f"{s}\t{p}\n" for s, p in SAMPLE_MAP.items()))
    out = tmp_path / "out"
    assert (
        validate_main(["--omop", str(omop), "--prs", str(prs), "--sample-map", str(sample_map), "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "10 samples, 2 scores; kept 5, excluded 5" in printed
    report = json.loads((out / "validation_report.json").read_text())
    assert report["prs"]["excluded_by_reason"]["unknown_person_id"] == 1
    assert (out / "quarantine" / "prs_samples.parquet").is_file()
    assert validate_main(["--omop", str(omop), "--prs", str(prs), "--out", str(out)]) == 2
