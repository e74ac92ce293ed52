"""Synthetic genotypes and PGS Catalog scoring files whose scores track given per-sample targets.

The synthesizer can emit raw genetic data instead of finished scores: given sample ids, per-sample
(ancestry-dependent) allele frequencies and target values (e.g. latent genetic liabilities), this
writes a PLINK 1 fileset (bed-reader's streaming writer) and one scoring file per target, so that
`ehrfm score_prs` on the output recomputes scores that correlate with the targets.

Generative model: each score k has its own random variants and weights w; a sample's allele
frequency at a score variant is shifted on the logit scale by effect_strength x (normalised
weight, signed towards the effect allele) x (the sample's standardised target). Samples with a
high target therefore carry more effect alleles where weights are positive, and the score
sum_v w_v x dosage_v tracks the target, more closely with more variants per score.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from bed_reader import create_bed

from ehrfm.genetics.genotypes import MISSING
from ehrfm.genetics.variant_alleles import complement

# allele pairs that are not strand-ambiguous (no A/T, no C/G), so every scoring row can match
_PAIRS = np.array([("A", "C"), ("A", "G"), ("C", "A"), ("C", "T"), ("G", "A"), ("G", "T"), ("T", "C"), ("T", "G")])


@dataclass
class SyntheticGenotypes:
    bed: Path  # OUT/<prefix>.bed (with .bim/.fam)
    scoring_files: list[Path]
    pgs_ids: list[str]
    true_scores: np.ndarray  # float64 [n, K]: sum of weight x effect-allele dosage over all called genotypes


@dataclass(frozen=True)
class ScoreDesign:
    """Which variants each score uses, with which weight and on which allele (all [V, K], csc)."""

    weights: sp.csc_matrix  # weight of score k on variant v (0 = not in the score)
    sign: sp.csc_matrix  # +1 where the effect allele is allele 1, -1 where it is allele 2 (same pattern)

    def on_allele_1(self) -> sp.csc_matrix:
        """Signed weights: what each genotype's allele-1 count is multiplied by."""
        return self.weights.multiply(self.sign).tocsc()

    def allele_2_weights(self) -> sp.csc_matrix:
        """Weights whose effect allele is allele 2 (dosage 2 - count), zero elsewhere."""
        return self.weights.multiply(self.sign < 0).tocsc()


def _design(rng: np.random.Generator, n_variants: int, n_scores: int, per_score: int) -> ScoreDesign:
    per_score = min(per_score, n_variants)
    rows = np.concatenate([np.sort(rng.choice(n_variants, per_score, replace=False)) for _ in range(n_scores)])
    cols = np.repeat(np.arange(n_scores), per_score)
    weights = np.round(rng.normal(0.0, 0.1, len(rows)), 6)
    weights[weights == 0] = 1e-6
    sign = np.where(rng.random(len(rows)) < 0.5, 1.0, -1.0)
    shape = (n_variants, n_scores)
    return ScoreDesign(
        sp.csc_matrix((weights, (rows, cols)), shape=shape), sp.csc_matrix((sign, (rows, cols)), shape=shape)
    )


def _bim_properties(rng: np.random.Generator, n_variants: int) -> dict[str, np.ndarray]:
    chromosome = np.sort(rng.integers(1, 23, n_variants))
    gaps = rng.integers(100, 20_000, n_variants)
    starts = np.r_[0, np.flatnonzero(np.diff(chromosome)) + 1]
    position = np.cumsum(gaps)
    position -= np.repeat(position[starts] - gaps[starts], np.diff(np.r_[starts, n_variants]))
    pairs = _PAIRS[rng.integers(0, len(_PAIRS), n_variants)]
    return {
        "chromosome": chromosome.astype(str),
        "sid": np.array([f"rs{90_000_000 + v}" for v in range(n_variants)]),
        "cm_position": np.zeros(n_variants),
        "bp_position": position.astype(np.int32),
        "allele_1": pairs[:, 0],
        "allele_2": pairs[:, 1],
    }


def _standardise(values: np.ndarray) -> np.ndarray:
    centred = values - values.mean(axis=0)
    scale = values.std(axis=0)
    return centred / np.where(scale > 0, scale, 1.0)


def _write_scoring_file(
    path: Path,
    pgs_id: str,
    rows: np.ndarray,
    weights: np.ndarray,
    on_a1: np.ndarray,
    bim: dict[str, np.ndarray],
    flip: np.ndarray,
    build: str,
) -> None:
    effect = np.where(on_a1, bim["allele_1"][rows], bim["allele_2"][rows])
    other = np.where(on_a1, bim["allele_2"][rows], bim["allele_1"][rows])
    lines = [
        "###PGS CATALOG SCORING FILE - see https://www.pgscatalog.org/downloads/#dl_ftp_scoring for additional information",
        "#format_version=2.0",
        "##POLYGENIC SCORE (PGS) INFORMATION",
        f"#pgs_id={pgs_id}",
        f"#pgs_name={pgs_id}_synthetic",
        "#trait_reported=synthetic latent liability",
        "#weight_type=beta",
        f"#genome_build={build}",
        f"#variants_number={len(rows)}",
        "rsID\tchr_name\tchr_position\teffect_allele\tother_allele\teffect_weight",
    ]
    for i, row in enumerate(rows):
        ea, oa = (complement(effect[i]), complement(other[i])) if flip[i] else (effect[i], other[i])
        lines.append(
            f"{bim['sid'][row]}\t{bim['chromosome'][row]}\t{bim['bp_position'][row]}\t{ea}\t{oa}\t{float(weights[i])!r}"
        )
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def write_genotypes_and_scores(
    out_dir: str | Path,
    sample_ids: Sequence[str],
    allele_freqs: np.ndarray,
    targets: np.ndarray,
    seed: int,
    *,
    pgs_ids: Sequence[str] | None = None,
    variants_per_score: int = 200,
    effect_strength: float = 0.3,
    missing_rate: float = 0.0,
    strand_flip_fraction: float = 0.1,
    genome_build: str = "GRCh38",
    prefix: str = "genotypes",
    chunk_variants: int = 1024,
) -> SyntheticGenotypes:
    """Write OUT/<prefix>.bed/.bim/.fam and OUT/scores/<pgs_id>.txt.gz.

    allele_freqs: frequency of allele 1 per variant, [V] (one population) or [n, V] (per sample,
    e.g. ancestry proportions x population frequencies). targets: [n, K] values the K scores
    should track. strand_flip_fraction: scoring rows written on the other strand (the scorer
    must flip them back). missing_rate: genotypes set missing at random after drawing.
    """
    out = Path(out_dir)
    (out / "scores").mkdir(parents=True, exist_ok=True)
    sample_ids = np.asarray(sample_ids, dtype=str)
    freqs = np.asarray(allele_freqs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64).reshape(len(sample_ids), -1)
    n, n_scores = targets.shape
    n_variants = freqs.shape[-1]
    if freqs.ndim == 2 and freqs.shape[0] != n:
        raise ValueError(f"allele_freqs has {freqs.shape[0]} rows for {n} samples")
    pgs_ids = list(pgs_ids) if pgs_ids is not None else [f"PGS_SYN{k + 1:04d}" for k in range(n_scores)]
    if len(pgs_ids) != n_scores:
        raise ValueError(f"{len(pgs_ids)} pgs_ids for {n_scores} target columns")
    rng = np.random.default_rng(seed)
    design = _design(rng, n_variants, n_scores, variants_per_score)
    bim = _bim_properties(rng, n_variants)
    on_a1 = design.on_allele_1().tocsr()
    on_a2 = design.allele_2_weights().tocsr()
    direction = on_a1 / max(float(design.weights.data.std()), 1e-12)  # logit shift of allele 1 per unit of target
    z = _standardise(targets)
    true_scores = np.zeros((n, n_scores), dtype=np.float64)
    bed = out / f"{prefix}.bed"
    properties = {"fid": sample_ids, "iid": sample_ids, **bim}
    with create_bed(bed, iid_count=n, sid_count=n_variants, properties=properties) as writer:
        for start in range(0, n_variants, chunk_variants):
            stop = min(start + chunk_variants, n_variants)
            base = np.clip(freqs[..., start:stop], 1e-4, 1 - 1e-4)
            shift = effect_strength * (z @ direction[start:stop].T.toarray())  # [n, chunk]
            prob = 1.0 / (1.0 + np.exp(-(np.log(base / (1 - base)) + shift)))
            genotypes = rng.binomial(2, prob).astype(np.int8)
            if missing_rate > 0:
                genotypes[rng.random(genotypes.shape) < missing_rate] = MISSING
            called = genotypes != MISSING
            true_scores += np.where(called, genotypes, 0).astype(np.float64) @ on_a1[start:stop].toarray()
            true_scores += 2.0 * (called.astype(np.float64) @ on_a2[start:stop].toarray())
            for column in range(stop - start):
                writer.write(genotypes[:, column])
    files = []
    flips = rng.random(design.weights.nnz) < strand_flip_fraction
    for k, pgs_id in enumerate(pgs_ids):
        lo, hi = design.weights.indptr[k], design.weights.indptr[k + 1]
        path = out / "scores" / f"{pgs_id}.txt.gz"
        _write_scoring_file(
            path,
            pgs_id,
            design.weights.indices[lo:hi],
            design.weights.data[lo:hi],
            design.sign.data[lo:hi] > 0,
            bim,
            flips[lo:hi],
            genome_build,
        )
        files.append(path)
    return SyntheticGenotypes(bed, files, pgs_ids, true_scores)


# Memory guard for the cohort path below: per-sample allele frequencies are a dense [n, V] array.
_MAX_FREQ_CELLS = 200_000_000


def emit_cohort_genotypes(cohort_dir: str | Path, seed: int, n_variants: int = 10_000) -> SyntheticGenotypes:
    """Replace a synthetic cohort's finished scores by genotypes + scoring files that reproduce them.

    The genotyped persons' score SUMs (prs/scores_wide.parquet) become the targets, so scores that
    `ehrfm score_prs` computes from cohort_dir/genotypes/ carry the same signal, ancestry shifts
    included; allele frequencies differ by ancestry (from truth/), as real population structure
    does. The finished score files are removed; the sample map and PCs stay.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    cohort = Path(cohort_dir)
    wide = pq.read_table(cohort / "prs" / "scores_wide.parquet")
    pgs_ids = [name for name in wide.column_names if name != "sample_id"]
    sample_ids = np.asarray(wide["sample_id"].to_pylist(), dtype=str)
    targets = (
        np.column_stack([wide[name].to_numpy() for name in pgs_ids]) if pgs_ids else np.zeros((len(sample_ids), 0))
    )
    if len(sample_ids) * n_variants > _MAX_FREQ_CELLS:
        raise ValueError(
            f"{len(sample_ids)} genotyped samples x {n_variants} variants is too large for the "
            f"synthetic genotype path (limit {_MAX_FREQ_CELLS:,} cells); lower genotype_variants"
        )
    truth = pq.read_table(cohort / "truth" / "persons", columns=["sample_id", "ancestry"])
    truth = truth.filter(pc.is_valid(truth["sample_id"]))
    ancestry_of = dict(zip(truth["sample_id"].to_pylist(), truth["ancestry"].to_pylist()))
    groups = sorted(set(ancestry_of.values()))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 9151]))
    base_logit = np.log(np.clip(rng.uniform(0.05, 0.95, n_variants), 1e-3, 1 - 1e-3))
    base_logit -= np.log1p(-np.exp(base_logit))  # logit of the shared base frequency
    group_freqs = {g: 1 / (1 + np.exp(-(base_logit + rng.normal(0, 0.4, n_variants)))) for g in groups}
    freqs = (
        np.stack([group_freqs[ancestry_of[s]] for s in sample_ids]) if len(sample_ids) else np.zeros((0, n_variants))
    )
    result = write_genotypes_and_scores(
        cohort / "genotypes", sample_ids, freqs, targets, seed, pgs_ids=pgs_ids, prefix="cohort"
    )
    for name in ("aggregated_scores.txt.gz", "scores.sscore", "scores_wide.parquet"):
        (cohort / "prs" / name).unlink()
    return result
