"""The matched scores as one sparse weight matrix over the genotyped variants, cut into blocks.

Genotypes count allele 1 of the .bim (g in 0..2). A weight w on a matched effect allele becomes
+w on g when the effect allele is allele 1, and -w on g plus a constant 2w when it is allele 2
(dosage of allele 2 = 2 - g; with mean imputation the imputed value obeys the same identity).
So every score is SUM = G @ W[:, k] + offset[k], G mean-imputed: one sparse matrix for all scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ehrfm.genetics.genotypes import GenotypeSet
from ehrfm.genetics.variant_match import ScoreMatch


@dataclass
class WeightMatrix:
    score_ids: list[str]
    targets: np.ndarray  # int64 [n_used]: global indices (GenotypeSet.variants rows) of scored variants, sorted
    weights: sp.csr_matrix  # float64 [n_used, K]: signed weight on the allele-1 count
    offsets: np.ndarray  # float64 [K]: 2 x the weights whose effect allele is allele 2

    @property
    def n_scores(self) -> int:
        return len(self.score_ids)


@dataclass(frozen=True)
class VariantBlock:
    """Consecutive scored variants of one fileset: what one worker reads in one go."""

    index: int
    fileset: int
    local: np.ndarray  # variant indices inside the fileset's .bed
    rows: tuple[int, int]  # [start, stop) rows of WeightMatrix.weights


def build_weight_matrix(matches: list[ScoreMatch]) -> WeightMatrix:
    """One column per score from the matched rows of each (passed) score."""
    tables = [m.matched() for m in matches]
    all_targets = np.concatenate([t["target"].to_numpy() for t in tables]) if tables else np.zeros(0, np.int64)
    targets = np.unique(all_targets)
    rows, cols, data = [], [], []
    offsets = np.zeros(len(matches), dtype=np.float64)
    for k, table in enumerate(tables):
        weight = table["effect_weight"].to_numpy(float)
        on_a1 = table["effect_is_a1"].to_numpy(bool)
        rows.append(np.searchsorted(targets, table["target"].to_numpy()))
        cols.append(np.full(len(table), k, dtype=np.int64))
        data.append(np.where(on_a1, weight, -weight))
        offsets[k] = 2.0 * weight[~on_a1].sum()
    matrix = sp.coo_matrix(
        (
            np.concatenate(data) if data else np.zeros(0),
            (np.concatenate(rows) if rows else np.zeros(0, int), np.concatenate(cols) if cols else np.zeros(0, int)),
        ),
        shape=(len(targets), len(matches)),
    ).tocsr()
    matrix.eliminate_zeros()  # a zero weight does not make a variant part of a score
    return WeightMatrix([m.score_id for m in matches], targets.astype(np.int64), matrix, offsets)


def plan_blocks(genotypes: GenotypeSet, weights: WeightMatrix, variants_per_block: int) -> list[VariantBlock]:
    """Cut the scored variants into blocks of at most `variants_per_block`, never across filesets."""
    fileset = genotypes.variants["fileset"].to_numpy()[weights.targets]
    local = genotypes.variants["local"].to_numpy()[weights.targets]
    blocks: list[VariantBlock] = []
    start = 0
    while start < len(weights.targets):
        stop = min(start + variants_per_block, len(weights.targets))
        same = np.flatnonzero(fileset[start:stop] != fileset[start])
        if len(same):
            stop = start + int(same[0])
        blocks.append(VariantBlock(len(blocks), int(fileset[start]), local[start:stop].copy(), (start, stop)))
        start = stop
    return blocks


def samples_per_block(n_samples: int, n_scores: int, variants_per_block: int, memory_mb: int) -> int:
    """Samples per work unit so one unit's arrays (partial sums, float genotypes,
    dense weights) stay within `memory_mb`."""
    per_sample = n_scores * 16 + variants_per_block * 10  # sums + imputation term; int8, mask, float64 dosages
    fixed = variants_per_block * n_scores * 8
    budget = max(memory_mb * 2**20 - fixed, 0)
    return int(min(n_samples, max(64, budget // per_sample)))
