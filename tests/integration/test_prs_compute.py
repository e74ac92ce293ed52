"""`ehrfm score_prs` end to end on the Ray Data path (shared `ray_cluster`).

References: plink2's .sscore for the CINECA chr22 fixture (pgsc_calc's expected outputs), numbers
worked out by hand for bed-reader's small.bed, an independent numpy computation for the files with
missing genotypes, and the known weights of the synthetic genotype writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from bed_reader import open_bed, to_bed

from ehrfm.genetics.genotypes import open_genotypes
from ehrfm.genetics.score import PrsMatchError, ScorePrsConfig, compute_prs, main
from ehrfm.prs.readers import read_prs
from ehrfm_synthetic.genotypes import write_genotypes_and_scores

pytestmark = pytest.mark.ray

CINECA = "prs_pgsc_calc_cineca_chr22"
EDGE = "plink_edgecase_fixtures_bedreader"
SMALL_BLOCKS = {"variants_per_block": 200, "samples_per_block": 700}  # several blocks on both axes


def _wide(out: Path, column: str = "SUM") -> pd.DataFrame:
    table = pd.read_csv(out / "aggregated_scores.txt.gz", sep="\t", dtype={"IID": str})
    assert list(table.columns) == ["sampleset", "IID", "PGS", "SUM", "DENOM", "AVG"]
    return table.pivot(index="IID", columns="PGS", values=column)


def _sscore(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path, sep="\t", dtype=str)
    table.columns = [c.lstrip("#") for c in table.columns]
    return table.set_index("IID").drop(columns=[c for c in ("FID",) if c in table.columns]).astype(float)


def _write_score(path: Path, rows: list[tuple], build: str = "GRCh37") -> Path:
    lines = [
        f"#pgs_id={path.stem}",
        f"#genome_build={build}",
        "chr_name\tchr_position\teffect_allele\tother_allele\teffect_weight",
    ]
    path.write_text("\n".join(lines + ["\t".join(str(v) for v in row) for row in rows]) + "\n")
    return path


def test_cineca_scores_equal_plink2(ray_cluster, shared_data: Path, tmp_path: Path) -> None:
    data = shared_data / CINECA
    report = compute_prs(
        ScorePrsConfig(
            genotypes=str(data / "genotypes" / "cineca_synthetic_subset"),
            out=str(tmp_path),
            build="GRCh37",
            scores=[
                str(data / "scorefiles" / "PGS001229_22.txt"),
                str(data / "scorefiles" / "PGS001229_22_duplicate.txt"),
            ],
            **SMALL_BLOCKS,
        )
    )
    reference = _sscore(data / "expected_outputs" / "cineca_22_additive_0.sscore")
    sums, avgs, denoms = (
        _wide(tmp_path).loc[reference.index],
        _wide(tmp_path, "AVG").loc[reference.index],
        _wide(tmp_path, "DENOM").loc[reference.index],
    )
    assert len(sums) == 2504
    np.testing.assert_allclose(sums["PGS001229"], reference["PGS001229_22_SUM"], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(avgs["PGS001229"], reference["PGS001229_22_AVG"], rtol=1e-5, atol=1e-12)
    # mean imputation: DENOM = 2 x 782 for everyone, even the 41 samples with missing genotypes
    assert (denoms["PGS001229"] == reference["DENOM"]).all() and (denoms["PGS001229"] == 1564).all()
    assert report["samples_with_missing_genotypes"] == 41 == int((reference["ALLELE_CT"] < 1564).sum())
    assert report["missing_genotypes_imputed"] == int(((1564 - reference["ALLELE_CT"]) / 2).sum())

    # duplicatetest: pgsc_calc put its rs5746679 row (effect A, the other allele than PGS001229's G) in a
    # second plink2 file, so the additive_0 reference lacks exactly that term; we score all 8 rows at once
    two = _sscore(data / "expected_outputs" / "cineca_22_additive_0_PGS001229_and_duplicatetest.sscore")
    count_a = open_bed(data / "genotypes" / "cineca_synthetic_subset.bed").read(np.s_[:, 0], dtype="float64")[:, 0]
    assert not np.isnan(count_a).any()  # rs5746679: A is allele 1, no missing call
    term = pd.Series(1.045457e-02 * count_a, index=read_prs(tmp_path / "aggregated_scores.txt.gz").sample_ids)
    np.testing.assert_allclose(
        sums["duplicatetest"] - term.loc[two.index], two["duplicatetest_SUM"], rtol=1e-5, atol=1e-9
    )
    assert (denoms["duplicatetest"] == 16).all()  # per-score DENOM: its own 8 variants

    written = json.loads((tmp_path / "match_report.json").read_text())
    first = written["scores"][0]
    assert first["counts"]["matched"] == 782 and first["counts"]["excluded_ambiguous"] == 47
    assert first["counts"]["missing_not_in_target"] == 6 and first["passed"]
    assert written["n_scored_variants"] == 782 and written["rows_written"] == 2 * 2504
    log = pq.read_table(tmp_path / "match_log.parquet").to_pandas()
    assert len(log) == 835 + 8 and log["status"].value_counts().to_dict() == {
        "matched": 790,
        "excluded": 47,
        "unmatched": 6,
    }
    scores = read_prs(tmp_path / "aggregated_scores.txt.gz")  # the project's PRS reader takes it as is
    assert scores.pgs_ids == ["PGS001229", "duplicatetest"] and scores.values.shape == (2504, 2)


def test_cineca_plink2_scorefile_with_one_denominator(ray_cluster, shared_data: Path, tmp_path: Path) -> None:
    """pgsc_calc's own matched plink2 input, one DENOM for both scores as in a single plink2 run."""
    data = shared_data / CINECA
    compute_prs(
        ScorePrsConfig(
            genotypes=str(data / "genotypes" / "cineca_synthetic_subset"),
            out=str(tmp_path),
            denominator="shared",
            scores=[str(data / "expected_outputs" / "cineca_22_additive_0.plink2_scorefile.gz")],
            **SMALL_BLOCKS,
        )
    )
    reference = _sscore(data / "expected_outputs" / "cineca_22_additive_0_PGS001229_and_duplicatetest.sscore")
    sums, avgs = _wide(tmp_path).loc[reference.index], _wide(tmp_path, "AVG").loc[reference.index]
    for score in ("PGS001229", "duplicatetest"):
        np.testing.assert_allclose(sums[score], reference[f"{score}_SUM"], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(avgs[score], reference[f"{score}_AVG"], rtol=1e-5, atol=1e-12)
    assert (_wide(tmp_path, "DENOM") == 1564).all().all()


def test_small_fixture_worked_by_hand(ray_cluster, shared_data: Path, tmp_path: Path) -> None:
    """small.bed allele-1 counts: iid1 [1 0 . 0], iid2 [2 0 . 2], iid3 [0 1 2 0] (bed-reader's docs)."""
    score = _write_score(
        tmp_path / "hand.txt",
        [
            (1, 1, "A", "G", 9.0),  # sid1 has alleles A/A: no orientation fits -> unmatched
            (1, 100, "T", "C", 1.0),  # sid2, effect T = allele 1: dosage [0 0 1]
            (5, 1000, "A", "C", 0.5),  # sid3, missing for iid1/iid2: imputed with the mean count 2
            ("Y", 1004, "G", "T", 2.0),  # sid4, effect G = allele 2: dosage 2 - [0 2 0] = [2 0 2]
        ],
    )
    report = compute_prs(
        ScorePrsConfig(genotypes=str(shared_data / EDGE / "small.bed"), scores=[str(score)], out=str(tmp_path / "out"))
    )
    sums = _wide(tmp_path / "out").loc[["iid1", "iid2", "iid3"], "hand"]
    np.testing.assert_allclose(sums, [0 + 1.0 + 4.0, 0 + 1.0 + 0.0, 1.0 + 1.0 + 4.0])
    np.testing.assert_allclose(
        _wide(tmp_path / "out", "AVG").loc[["iid1", "iid2", "iid3"], "hand"], [5 / 6, 1 / 6, 1.0]
    )
    counts = report["scores"][0]["counts"]
    assert (counts["matched"], counts["missing_allele_mismatch"], counts["allele_swapped"]) == (3, 1, 1)
    assert report["scores"][0]["match_rate"] == 0.75 and report["samples_with_missing_genotypes"] == 2


def _independent_scores(bed: Path, table: pd.DataFrame, rows: list[tuple]) -> np.ndarray:
    """Weights x effect-allele dosage, missing = mean dosage: plain numpy over the whole file."""
    counts = open_bed(bed).read(dtype="float64")  # allele-1 counts, NaN = missing
    total = np.zeros(counts.shape[0])
    for (_chrom, _pos, effect, _other, weight), (_, variant) in zip(rows, table.iterrows()):
        column = counts[:, variant.name].copy()
        column[np.isnan(column)] = np.nanmean(column)
        on_a1 = effect in (variant["a1"], {"A": "T", "C": "G", "G": "C", "T": "A"}[variant["a1"]])
        total += weight * (column if on_a1 else 2 - column)
    return total


def test_missing_genotypes_per_chromosome_filesets(ray_cluster, shared_data: Path, tmp_path: Path) -> None:
    bed = shared_data / EDGE / "some_missing.bed"
    genotypes = open_genotypes(bed)
    counts = open_bed(bed).read(dtype="int8")
    assert counts.shape == (100, 100) and int((counts == -127).sum()) == 2182  # README: 100 x 100 with missing
    table = genotypes.variants
    rng = np.random.default_rng(0)
    rows = []
    for i, variant in table.iterrows():  # every variant, alternating effect allele, every 5th on the other strand
        effect, other = (variant["a1"], variant["a2"]) if i % 2 else (variant["a2"], variant["a1"])
        if i % 5 == 0:
            effect, other = {"A": "T", "C": "G"}[effect], {"A": "T", "C": "G"}[other]
        rows.append((variant["chr"], int(variant["pos"]), effect, other, round(float(rng.normal()), 6)))
    score = _write_score(tmp_path / "alt.txt", rows)
    expected = _independent_scores(bed, table, rows)
    one = compute_prs(
        ScorePrsConfig(
            genotypes=str(bed),
            scores=[str(score)],
            out=str(tmp_path / "one"),
            variants_per_block=16,
            samples_per_block=32,
        )
    )
    np.testing.assert_allclose(_wide(tmp_path / "one").loc[genotypes.sample_ids, "alt"], expected, rtol=1e-12)
    assert one["scores"][0]["counts"]["strand_flipped"] == 20 and one["missing_genotypes_imputed"] == 2182
    # the same genotypes as one fileset per chromosome group, found by a glob
    reader = open_bed(bed)
    for name, keep in (("part_a", table["chr"].astype(int) <= 11), ("part_b", table["chr"].astype(int) > 11)):
        index = np.flatnonzero(keep.to_numpy())
        to_bed(
            tmp_path / f"{name}.bed",
            counts[:, index],
            properties={
                "fid": reader.fid,
                "iid": reader.iid,
                "sid": reader.sid[index],
                "chromosome": reader.chromosome[index],
                "bp_position": reader.bp_position[index],
                "allele_1": reader.allele_1[index],
                "allele_2": reader.allele_2[index],
            },
        )
    split = compute_prs(
        ScorePrsConfig(
            genotypes=str(tmp_path / "part_*"),
            scores=[str(score)],
            out=str(tmp_path / "split"),
            variants_per_block=16,
            samples_per_block=32,
        )
    )
    assert split["genotypes"]["filesets"] == ["part_a.bed", "part_b.bed"]
    np.testing.assert_allclose(_wide(tmp_path / "split").loc[genotypes.sample_ids, "alt"], expected, rtol=1e-12)


def test_synthetic_genotypes_round_trip(ray_cluster, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    n, n_variants = 300, 1500
    populations = rng.uniform(0.05, 0.95, (2, n_variants))
    freqs = rng.dirichlet([1.0, 1.0], n) @ populations  # per-sample, ancestry-weighted frequencies
    targets = rng.normal(size=(n, 3))
    sample_ids = [f"S{i:04d}" for i in range(n)]
    synthetic = write_genotypes_and_scores(
        tmp_path / "syn", sample_ids, freqs, targets, seed=11, variants_per_score=250, strand_flip_fraction=0.2
    )
    report = compute_prs(
        ScorePrsConfig(
            genotypes=str(synthetic.bed),
            out=str(tmp_path / "out"),
            build="GRCh38",
            scores=[str(p) for p in synthetic.scoring_files],
        )
    )
    assert [s["counts"]["matched"] for s in report["scores"]] == [250, 250, 250]
    assert all(s["counts"]["strand_flipped"] > 0 and s["build_check"] == "ok" for s in report["scores"])
    sums = _wide(tmp_path / "out").loc[sample_ids, synthetic.pgs_ids].to_numpy()
    np.testing.assert_allclose(sums, synthetic.true_scores, rtol=1e-10, atol=1e-10)
    correlations = [np.corrcoef(sums[:, k], targets[:, k])[0, 1] for k in range(3)]
    assert min(correlations) > 0.8, correlations


def test_refused_scores(ray_cluster, shared_data: Path, tmp_path: Path, capsys) -> None:
    data = shared_data / CINECA
    genotypes = str(data / "genotypes" / "cineca_synthetic_subset")
    catalog = str(data / "scorefiles" / "PGS001229_22.txt")
    assert (
        main(["--genotypes", genotypes, "--scores", catalog, "--out", str(tmp_path / "build"), "--build", "GRCh38"])
        == 2
    )
    assert "positions are on GRCh37, genotypes on GRCh38" in capsys.readouterr().err
    assert not (tmp_path / "build" / "aggregated_scores.txt.gz").exists()
    assert json.loads((tmp_path / "build" / "match_report.json").read_text())["scores"][0]["build_check"] == "refused"
    with pytest.raises(PrsMatchError, match=r"782 of 835 variants matched \(93.7% < minimum 95%\)"):
        compute_prs(
            ScorePrsConfig(genotypes=genotypes, scores=[catalog], out=str(tmp_path / "rate"), min_match_rate=0.95)
        )
    rsid_only = str(shared_data / "prs_pgs_catalog_scoring_files" / "PGS000001.txt.gz")
    report = compute_prs(
        ScorePrsConfig(
            genotypes=genotypes, scores=[catalog, rsid_only], out=str(tmp_path / "drop"), drop_failing_scores=True
        )
    )
    assert report["scored"] == ["PGS001229"] and len(report["refused"]) == 1
    assert "0 of 77 variants matched" in report["refused"][0] and "harmonised" in report["refused"][0]
