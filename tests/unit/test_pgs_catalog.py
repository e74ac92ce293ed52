"""Scoring-file parsing on every real PGS Catalog / pgsc_calc file in shared/data.

Each file is either parsed (row count, build, positions, alleles as in the README) or has its
rows refused with the reason; counts come from the files' READMEs and a plain read of the file.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from ehrfm.genetics.pgs_catalog import ScoringFileError, find_scoring_files, read_header, read_scoring_file

CATALOG = "prs_pgs_catalog_scoring_files"
CINECA = "prs_pgsc_calc_cineca_chr22"


def _only(path: Path):
    scores = read_scoring_file(path)
    assert len(scores) == 1
    return scores[0]


def test_original_format_without_positions(shared_data: Path) -> None:
    score = _only(shared_data / CATALOG / "PGS000001.txt.gz")
    assert score.score_id == "PGS000001" and score.n_rows == 77
    assert score.genome_build is None and not score.harmonised  # genome_build=NR
    assert score.variants["pos"].isna().all()  # no chr_position column: cannot be matched by position
    assert score.variants["unsupported"].isna().all()
    first = score.variants.iloc[0]
    assert (first["rsid"], first["chr"], first["effect_allele"], first["other_allele"]) == (
        "rs78540526",
        "11",
        "T",
        "C",
    )
    assert first["effect_weight"] == pytest.approx(0.16220387987485377)
    header, lines = read_header(shared_data / CATALOG / "PGS000001.txt.gz")
    assert lines == 14 and header["pgs_name"] == "PRS77_BC" and header["format_version"] == "2.0"


@pytest.mark.parametrize(
    "name, build, first_pos",
    [
        ("PGS000001_hmPOS_GRCh37.txt.gz", "GRCh37", 69331418),
        ("PGS000001_hmPOS_GRCh38.txt.gz", "GRCh38", 69516650),
        ("PGS000002_hmPOS_GRCh38.txt.gz", "GRCh38", 69516650),
    ],
)
def test_harmonised_files_use_hm_positions(shared_data: Path, name: str, build: str, first_pos: int) -> None:
    score = _only(shared_data / CATALOG / name)
    assert score.harmonised and score.genome_build == build and score.n_rows == 77
    assert score.variants["pos"].notna().all()
    assert int(score.variants["pos"].iloc[0]) == first_pos and score.variants["chr"].iloc[0] == "11"
    assert score.variants["unsupported"].isna().all()


def test_original_and_harmonised_weights_agree(shared_data: Path) -> None:
    original = _only(shared_data / CATALOG / "PGS000002.txt.gz").variants
    harmonised = _only(shared_data / CATALOG / "PGS000002_hmPOS_GRCh38.txt.gz").variants
    np.testing.assert_array_equal(original["effect_weight"].to_numpy(), harmonised["effect_weight"].to_numpy())
    assert original["effect_allele"].tolist() == harmonised["effect_allele"].tolist()


def test_dominant_and_recessive_rows_are_refused(shared_data: Path) -> None:
    score = _only(shared_data / CATALOG / "PGS000802_hmPOS_GRCh37.txt")
    assert score.n_rows == 19 and score.genome_build == "GRCh37"
    assert score.unsupported_counts() == {"dominant": 7, "recessive": 7}
    first = score.variants.iloc[0]  # rs10936599 is_dominant=True: never scored additively
    assert first["rsid"] == "rs10936599" and first["unsupported"] == "dominant"
    assert int(score.variants["unsupported"].isna().sum()) == 5


def test_genotype_weights_are_refused(shared_data: Path) -> None:
    score = _only(shared_data / CATALOG / "PGS004255_hmPOS_GRCh38.txt.gz")
    assert score.n_rows == 30 and score.genome_build == "GRCh38"  # HmPOS_build wins over genome_build=hg19
    assert score.unsupported_counts() == {"genotype_weights": 30}
    assert score.variants["effect_weight"].isna().all()


def test_complex_hla_alleles_are_refused(shared_data: Path) -> None:
    score = _only(shared_data / CATALOG / "complex_variants_PGS000021.txt")
    assert score.n_rows == 33 and score.score_id == "complex_variants_PGS000021"  # no header: named by file
    assert score.unsupported_counts() == {"diplotype": 5, "haplotype": 3}
    plain = score.variants[score.variants["unsupported"].isna()]
    assert len(plain) == 25 and plain["rsid"].str.startswith("rs").all()
    assert plain["pos"].isna().all()  # rsID only: reported as unmatched (no_position) later


def test_dominant_recessive_custom_file(shared_data: Path) -> None:
    score = _only(shared_data / CINECA / "scorefiles" / "scorefile_dominant_and_recessive.txt")
    assert score.n_rows == 835 and score.unsupported_counts() == {"dominant": 1, "recessive": 1}


def test_cineca_scoring_files(shared_data: Path) -> None:
    catalog = _only(shared_data / CINECA / "scorefiles" / "PGS001229_22.txt")
    custom = _only(shared_data / CINECA / "scorefiles" / "scorefile.txt")
    assert (catalog.score_id, catalog.n_rows, catalog.genome_build) == ("PGS001229", 835, "GRCh37")
    assert (custom.score_id, custom.n_rows) == ("PGS001229_22", 835)  # #pgs_name, no #pgs_id
    np.testing.assert_allclose(catalog.variants["effect_weight"], custom.variants["effect_weight"], rtol=1e-6)
    assert catalog.variants["pos"].tolist() == custom.variants["pos"].tolist()
    duplicate = _only(shared_data / CINECA / "scorefiles" / "PGS001229_22_duplicate.txt")
    assert duplicate.score_id == "duplicatetest" and duplicate.n_rows == 8


def test_plink2_multi_score_file(shared_data: Path) -> None:
    first, second = read_scoring_file(shared_data / CINECA / "scorefiles" / "multiscore.txt")
    assert (first.score_id, second.score_id) == ("PGS001229_22", "second_score")
    assert first.n_rows == 829 and first.variants.iloc[0][["chr", "pos", "effect_allele", "other_allele"]].tolist() == [
        "22",
        17080378,
        "G",
        "A",
    ]
    reference = read_scoring_file(
        shared_data / CINECA / "expected_outputs" / "cineca_22_additive_0.plink2_scorefile.gz"
    )
    # pgsc_calc writes 0 where a variant is not in a score: 782 rows, duplicatetest has 7 of them
    assert [(s.score_id, s.n_rows) for s in reference] == [("PGS001229", 782), ("duplicatetest", 7)]


def test_broken_files_name_the_file(shared_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ScoringFileError, match="README.txt"):
        read_scoring_file(shared_data / CATALOG / "README.txt")
    no_weight = tmp_path / "no_weight.txt"
    no_weight.write_text("#pgs_id=X\nrsID\tchr_name\tchr_position\teffect_allele\n" + "rs1\t1\t10\tA\n" * 3)
    with pytest.raises(ScoringFileError, match=r"no_weight.txt: required column effect_weight missing .*3 rows"):
        read_scoring_file(no_weight)
    with pytest.raises(ScoringFileError, match="not found"):
        read_scoring_file(tmp_path / "absent.txt")


def test_bad_weights_and_alleles_are_counted_not_dropped(tmp_path: Path) -> None:
    path = tmp_path / "mixed.txt.gz"
    rows = ["chr1\t100\ta\tg\t0.5", "1\t200\tA\tG\tNA", "1\t300\tHLA-B*57\tG\t0.1", "23\t400\tC\t\t-0.2"]
    with gzip.open(path, "wt") as handle:
        handle.write(
            "#pgs_id=PGS_T\n#genome_build=hg38\nchr_name\tchr_position\teffect_allele\tother_allele\t"
            "effect_weight\n" + "\n".join(rows) + "\n"
        )
    score = _only(path)
    assert score.genome_build == "GRCh38" and score.n_rows == 4
    assert score.variants["unsupported"].tolist() == [None, "invalid_weight", "complex_allele", None]
    assert score.variants["chr"].tolist() == ["1", "1", "1", "X"]  # chr prefix and PLINK code 23 normalised
    assert score.variants["effect_allele"].iloc[0] == "A" and score.variants["other_allele"].iloc[3] is None


def test_find_scoring_files(shared_data: Path) -> None:
    found = find_scoring_files(str(shared_data / CATALOG / "PGS00000*.txt.gz"))
    assert [p.name for p in found] == [
        "PGS000001.txt.gz",
        "PGS000001_hmPOS_GRCh37.txt.gz",
        "PGS000001_hmPOS_GRCh38.txt.gz",
        "PGS000002.txt.gz",
        "PGS000002_hmPOS_GRCh38.txt.gz",
    ]
    assert len(find_scoring_files(shared_data / CINECA / "scorefiles")) == 7
