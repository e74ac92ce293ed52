"""PRS scoring on Ray Data: variant blocks x sample blocks in parallel, partial scores summed.

Two passes over the scored variants, each a Ray Data map over work units:
1. frequencies: one unit per variant block (all samples, read in bounded sample chunks) -> the
   mean allele-1 count of every scored variant, needed for plink2's mean imputation;
2. scores: one unit per (sample block, variant block) -> partial SUM and ALLELE_CT of those
   samples over those variants. The driver adds the partials of a sample block as they stream in
   and hands the block on as soon as all its variant blocks have arrived, so at most a few sample
   blocks of [samples, K] sums are held at once, whatever the cohort size.
Each unit reads only its own genotypes (bed-reader, int8) and its rows of the sparse weight
matrix (one object-store entry per variant block).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import ray

from ehrfm.genetics.genotypes import GenotypeSet, read_block
from ehrfm.genetics.kernel import allele_sums, mean_dosage, score_block
from ehrfm.genetics.weights import VariantBlock, WeightMatrix, samples_per_block


@dataclass(frozen=True)
class RunSettings:
    variants_per_block: int = 2048
    samples_per_block: int = 0  # 0: as many as fit in memory_mb (prs_weights.samples_per_block)
    memory_mb: int = 256  # arrays of one work unit; Ray is asked for this plus a worker's own footprint


WORKER_BASELINE_MB = 192  # a Ray worker with numpy/scipy/bed-reader imported, before any block


@dataclass
class SampleBlockScores:
    """SUM of samples [start, stop) over every scored variant, and their missing genotypes."""

    start: int
    stop: int
    sums: np.ndarray  # float64 [n, K]
    missing: np.ndarray  # int32 [n]: genotypes imputed (over all scored variants)


def block_layouts(genotypes: GenotypeSet, blocks: list[VariantBlock]) -> list[ray.ObjectRef]:
    return [ray.put((genotypes.filesets[b.fileset], b.local)) for b in blocks]


def _frequency_unit(batch: dict, layouts: list, n_samples: int, chunk: int) -> dict:
    index = int(batch["block"][0])
    fileset, local = ray.get(layouts[index])
    total = np.zeros(len(local), dtype=np.float64)
    called = np.zeros(len(local), dtype=np.int64)
    for start in range(0, n_samples, chunk):
        part_total, part_called = allele_sums(read_block(fileset, local, slice(start, min(start + chunk, n_samples))))
        total += part_total
        called += part_called
    return {"block": np.array([index]), "total": total[None, :], "called": called[None, :]}


def variant_means(
    genotypes: GenotypeSet,
    blocks: list[VariantBlock],
    settings: RunSettings,
    layouts: list[ray.ObjectRef] | None = None,
) -> tuple[np.ndarray, int]:
    """(mean allele-1 count of every scored variant, number of variants without a single call)."""
    layouts = layouts if layouts is not None else block_layouts(genotypes, blocks)
    n_used = blocks[-1].rows[1] if blocks else 0
    chunk = max(1, settings.memory_mb * 2**20 // max(2 * settings.variants_per_block, 1))  # int8 + mask
    # one input block per unit: one task per unit, so load balances and a task holds one unit's output
    ds = ray.data.from_items([{"block": b.index} for b in blocks], override_num_blocks=len(blocks)).map_batches(
        _frequency_unit,
        batch_size=1,
        batch_format="numpy",
        num_cpus=1,
        memory=(settings.memory_mb + WORKER_BASELINE_MB) * 2**20,
        fn_kwargs={"layouts": layouts, "n_samples": genotypes.n_samples, "chunk": chunk},
    )
    total = np.zeros(n_used, dtype=np.float64)
    called = np.zeros(n_used, dtype=np.int64)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for index, block_total, block_called in zip(batch["block"], batch["total"], batch["called"]):
            start, stop = blocks[int(index)].rows
            total[start:stop] = block_total
            called[start:stop] = block_called
    return mean_dosage(total, called), int((called == 0).sum())


def _score_unit(batch: dict, layouts: list, weight_blocks: list, means_ref: list) -> dict:
    sample_block = int(batch["sample_block"][0])
    variant_block = int(batch["variant_block"][0])
    start, stop = int(batch["start"][0]), int(batch["stop"][0])
    fileset, local = ray.get(layouts[variant_block])
    weights, rows = ray.get(weight_blocks[variant_block])
    mean = ray.get(means_ref[0])[rows[0] : rows[1]]
    sums, missing = score_block(read_block(fileset, local, slice(start, stop)), mean, weights)
    return {"sample_block": np.array([sample_block]), "sums": sums[None], "missing": missing[None]}


def score_sample_blocks(
    genotypes: GenotypeSet,
    weights: WeightMatrix,
    blocks: list[VariantBlock],
    means: np.ndarray,
    settings: RunSettings,
    layouts: list[ray.ObjectRef] | None = None,
) -> Iterator[SampleBlockScores]:
    """Finished sample blocks (offsets included), in the order they complete."""
    layouts = layouts if layouts is not None else block_layouts(genotypes, blocks)
    weight_blocks = [ray.put((weights.weights[b.rows[0] : b.rows[1]], b.rows)) for b in blocks]
    means_ref = [ray.put(means)]
    n = genotypes.n_samples
    step = settings.samples_per_block or samples_per_block(
        n, weights.n_scores, settings.variants_per_block, settings.memory_mb
    )
    bounds = [(s, min(s + step, n)) for s in range(0, n, step)]
    units = [
        {"sample_block": i, "variant_block": b.index, "start": lo, "stop": hi}
        for i, (lo, hi) in enumerate(bounds)
        for b in blocks
    ]
    ds = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        _score_unit,
        batch_size=1,
        batch_format="numpy",
        num_cpus=1,
        memory=(settings.memory_mb + WORKER_BASELINE_MB) * 2**20,
        fn_kwargs={"layouts": layouts, "weight_blocks": weight_blocks, "means_ref": means_ref},
    )
    pending: dict[int, list] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for block_id, sums, missing in zip(batch["sample_block"], batch["sums"], batch["missing"]):
            block_id = int(block_id)
            if block_id not in pending:
                pending[block_id] = [np.array(sums, dtype=np.float64), np.array(missing, dtype=np.int32), 1]
            else:
                pending[block_id][0] += sums
                pending[block_id][1] += missing
                pending[block_id][2] += 1
            if pending[block_id][2] == len(blocks):
                total, missing_total, _ = pending.pop(block_id)
                lo, hi = bounds[block_id]
                yield SampleBlockScores(lo, hi, total + weights.offsets[None, :], missing_total)
    if pending:
        raise RuntimeError(f"{len(pending)} sample block(s) did not receive all {len(blocks)} variant blocks")
