"""Variant matching rules (pgsc_calc defaults) on hand-made variants, and on the real CINECA data
against the variant set plink2 used (expected_outputs/*.sscore.vars)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ehrfm.genetics.genotypes import open_genotypes
from ehrfm.genetics.pgs_catalog import Score, read_scoring_file
from ehrfm.genetics.variant_match import MatchOptions, match_score, prepare_target, refusal_message

CINECA = "prs_pgsc_calc_cineca_chr22"

# .bim rows: chr, pos, id, a1 (ALT, counted), a2 (REF)
TARGET = pd.DataFrame(
    [
        ("1", 100, "v100", "G", "A"),
        ("1", 200, "v200", "C", "A"),
        ("1", 300, "v300", "T", "A"),
        ("1", 400, "v400", "C", "A"),
        ("1", 400, "v400b", "G", "A"),
        ("1", 500, "v500", "T", "C"),
        ("1", 600, "v600", "G", "T"),
    ],
    columns=["chr", "pos", "id", "a1", "a2"],
)


def _score(rows: list[tuple], score_id: str = "S") -> Score:
    frame = pd.DataFrame(rows, columns=["chr", "pos", "effect_allele", "other_allele", "effect_weight", "unsupported"])
    frame.insert(0, "row_nr", np.arange(len(frame)))
    frame.insert(1, "rsid", None)
    frame["pos"] = frame["pos"].astype("Int64")
    for column in ("chr", "effect_allele", "other_allele", "unsupported"):
        frame[column] = pd.Series(frame[column].tolist(), dtype=object)
    return Score(score_id, "hand-made", {}, "GRCh38", False, frame)


def _match(rows: list[tuple], **options):
    result = match_score(_score(rows), prepare_target(TARGET), MatchOptions(**options))
    return result, result.log.set_index("row_nr")


def test_match_types_and_weight_orientation() -> None:
    result, log = _match(
        [
            ("1", 100, "A", "G", 0.1, None),  # effect = REF (allele 2): refalt, weight on 2 - count
            ("1", 100, "G", "A", 0.2, None),  # effect = ALT (allele 1): altref  (same variant, other score row)
            ("1", 200, "T", "G", 0.3, None),  # other strand of A/C: refalt_flip
            ("1", 500, "A", "G", 0.4, None),  # other strand of C/T with effect on T: altref_flip
            ("1", 600, "T", None, 0.5, None),  # effect allele only, = REF
        ]
    )
    assert log["match_type"].tolist()[2:] == ["refalt_flip", "altref_flip", "ref_no_oa"]
    # rows 0 and 1 both land on v100: pgsc_calc excludes both (keep_first_match off)
    assert log.loc[[0, 1], "status"].tolist() == ["excluded", "excluded"]
    assert log.loc[[0, 1], "reason"].tolist() == ["duplicate_target", "duplicate_target"]
    assert log.loc[2:, "status"].eq("matched").all()
    assert log.loc[2:, "effect_is_a1"].tolist() == [False, True, False]
    assert log.loc[2:, "strand_flipped"].tolist() == [True, True, False]
    counts = result.summary["counts"]
    assert (counts["matched"], counts["excluded_duplicate_target"], counts["strand_flipped"]) == (3, 2, 2)
    assert counts["allele_swapped"] == 2
    assert result.summary["match_rate"] == pytest.approx(3 / 5)
    assert result.summary["weight_share_matched"] == pytest.approx(1.2 / 1.5)
    assert not result.passed  # 60% < 75%
    matched = result.matched()
    assert matched["target"].tolist() == [1, 5, 6] and matched["effect_is_a1"].tolist() == [False, True, False]


def test_ambiguous_multiallelic_and_missing() -> None:
    rows = [
        ("1", 300, "A", "T", 1.0, None),  # A/T target SNP: strand-ambiguous
        ("1", 400, "A", "G", 1.0, None),  # two target variants at 1:400 (split multi-allelic)
        ("1", 200, "A", "T", 1.0, None),  # A/C target, no orientation of A/T fits
        ("2", 100, "A", "G", 1.0, None),  # chromosome 2 is not genotyped
        (None, None, "A", "G", 1.0, None),  # no position (rsID-only file)
        ("1", 100, "A", "G", 1.0, "dominant"),  # refused by the parser, never matched
    ]
    result, log = _match(rows)
    assert log["status"].tolist() == ["excluded", "excluded", "unmatched", "unmatched", "unmatched", "unsupported"]
    assert log["reason"].tolist() == [
        "ambiguous",
        "multiallelic",
        "allele_mismatch",
        "not_in_target",
        "no_position",
        "dominant",
    ]
    counts = result.summary["counts"]
    assert counts["rows"] == 6 == counts["matched"] + counts["excluded"] + counts["missing"] + counts["unsupported"]
    assert "matched 0 of 6" not in refusal_message(result.summary)
    assert "0 of 6 variants matched" in refusal_message(result.summary)
    # pgsc_calc's --keep_ambiguous / --keep_multiallelic
    _, kept = _match(rows, keep_ambiguous=True, keep_multiallelic=True)
    assert kept["status"].tolist()[:2] == ["matched", "matched"]
    assert kept.loc[0, "match_type"] == "refalt" and kept.loc[1, "target_id"] == "v400b"


def test_cineca_match_counts_agree_with_plink2_variant_set(shared_data: Path) -> None:
    genotypes = open_genotypes(shared_data / CINECA / "genotypes" / "cineca_synthetic_subset")
    target = prepare_target(genotypes.variants)
    score = read_scoring_file(shared_data / CINECA / "scorefiles" / "PGS001229_22.txt")[0]
    result = match_score(score, target, MatchOptions())
    counts = result.summary["counts"]
    # README: 782 of 835 matched, 47 strand-ambiguous dropped, 6 unmatched
    assert (counts["rows"], counts["matched"], counts["excluded_ambiguous"], counts["missing_not_in_target"]) == (
        835,
        782,
        47,
        6,
    )
    assert counts["strand_flipped"] == 0 and result.passed
    matched = result.log[result.log["status"] == "matched"]
    ids = {
        f"{c}:{p}:{r}:{a}" for c, p, r, a in matched[["chr", "pos", "target_ref", "target_alt"]].itertuples(index=False)
    }
    plink_vars = (shared_data / CINECA / "expected_outputs" / "cineca_22_additive_0.sscore.vars").read_text().split()
    assert len(plink_vars) == 782 and ids == set(plink_vars)
    # the orientation: pgsc_calc's plink2 file names the effect allele; it is REF exactly where we flip the sign
    with gzip.open(shared_data / CINECA / "expected_outputs" / "cineca_22_additive_0.plink2_scorefile.gz", "rt") as f:
        rows = [line.split("\t") for line in f.read().splitlines()[1:]]
    effect_is_ref = {r[0] for r in rows if float(r[2]) != 0 and r[1] == r[0].split(":")[2]}
    swapped = {
        f"{c}:{p}:{r}:{a}"
        for c, p, r, a in matched.loc[~matched["effect_is_a1"], ["chr", "pos", "target_ref", "target_alt"]].itertuples(
            index=False
        )
    }
    assert swapped == effect_is_ref and counts["allele_swapped"] == len(effect_is_ref) == 216
