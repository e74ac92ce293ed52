"""The arithmetic of one genotype block, free of Ray: allele sums for the frequencies, and partial
scores with plink2's mean imputation.

plink2 `--score` defaults reproduced here (checked against its .sscore output): a missing genotype
contributes the variant's mean allele count over the samples with a call (2 x the imputed allele
frequency). Because missing genotypes are imputed, the average's denominator does not depend on
missingness: DENOM = 2 x the scored variants for every sample and AVG = SUM / DENOM, while
ALLELE_CT (2 x the called variants) only reports missingness.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ehrfm.genetics.genotypes import MISSING

DENSE_WEIGHTS_ABOVE = 0.02  # weight-block density above which a dense BLAS product is faster


def allele_sums(genotypes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum of allele-1 counts, number of called samples) per variant of an int8 [samples, variants] block."""
    n_missing = (genotypes == MISSING).sum(axis=0, dtype=np.int64)
    total = genotypes.sum(axis=0, dtype=np.int64) - MISSING * n_missing  # undo the -127 codes without a copy
    return total.astype(np.float64), genotypes.shape[0] - n_missing


def mean_dosage(total: np.ndarray, called: np.ndarray) -> np.ndarray:
    """Mean allele-1 count per variant; 0 where no sample has a call (nothing to impute from)."""
    out = np.zeros(len(total), dtype=np.float64)
    np.divide(total, called, out=out, where=called > 0)
    return out


def score_block(genotypes: np.ndarray, mean: np.ndarray, weights: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Partial SUM [samples, K] of one block (without the allele-2 offsets) and the number of
    missing (imputed) genotypes of each sample in it."""
    n_samples, n_variants = genotypes.shape
    missing = genotypes == MISSING
    called_dosage = genotypes.astype(np.float64)
    called_dosage[missing] = 0.0
    dense = weights.nnz > DENSE_WEIGHTS_ABOVE * max(n_variants * weights.shape[1], 1)
    w = weights.toarray() if dense else weights
    sums = np.asarray(called_dosage @ w, dtype=np.float64)
    miss_rows, miss_cols = np.nonzero(missing)
    if len(miss_rows):  # mean imputation, only where genotypes are missing
        imputed = sp.csr_matrix((mean[miss_cols], (miss_rows, miss_cols)), shape=(n_samples, n_variants))
        correction = imputed @ w
        sums += correction.toarray() if sp.issparse(correction) else correction
    return sums, missing.sum(axis=1).astype(np.int32)


def denominators(weights: sp.csr_matrix, per_score: bool) -> np.ndarray:
    """plink2's DENOM per score: 2 x the score's own variants, or 2 x every scored variant (one
    plink2 run over a multi-score file, as pgsc_calc does)."""
    if per_score:
        return 2 * np.diff(weights.tocsc().indptr).astype(np.int64)
    return np.full(weights.shape[1], 2 * weights.shape[0], dtype=np.int64)
