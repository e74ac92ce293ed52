"""Benchmark: PRS scoring throughput of the Ray Data path vs a single-process numpy implementation.

Both score the same synthetic PLINK fileset (ehrfm_synthetic.genotypes) with the same matched
weights and plink2's semantics (mean imputation of missing genotypes), in the same run; the
results must agree. Throughput = scored variants x samples x scores / second of scoring (reading
genotypes, allele frequencies, weighted sums; data generation and matching are timed apart).

    .venv/bin/python bench/prs_scoring.py --samples 10000 --variants 100000 --scores 100 --out bench/prs_scoring.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from bed_reader import open_bed

from ehrfm.genetics.genotypes import GenotypeSet, open_genotypes
from ehrfm.genetics.ray_scoring import RunSettings, block_layouts, score_sample_blocks, variant_means
from ehrfm.genetics.score import ScorePrsConfig, load_scores, match_all
from ehrfm.genetics.weights import WeightMatrix, build_weight_matrix, plan_blocks
from ehrfm_synthetic.genotypes import write_genotypes_and_scores


def numpy_scores(genotypes: GenotypeSet, weights: WeightMatrix, chunk: int) -> np.ndarray:
    """plink2-equivalent in one process: per chunk of scored variants read float dosages, replace
    missing ones with the variant's mean over called samples, add dosages @ dense weights."""
    fileset = genotypes.variants["fileset"].to_numpy()[weights.targets]
    local = genotypes.variants["local"].to_numpy()[weights.targets]
    sums = np.zeros((genotypes.n_samples, weights.n_scores))
    for index, info in enumerate(genotypes.filesets):
        rows = np.flatnonzero(fileset == index)
        with open_bed(info.bed, iid_count=info.n_samples, sid_count=info.n_variants) as reader:
            for start in range(0, len(rows), chunk):
                part = rows[start : start + chunk]
                dosage = reader.read(index=np.s_[:, local[part]], dtype="float64")
                missing = np.isnan(dosage)
                means = np.where(
                    missing.all(axis=0), 0.0, np.nanmean(np.where(missing.all(axis=0), 0.0, dosage), axis=0)
                )
                dosage[missing] = np.take(means, np.nonzero(missing)[1])
                sums += dosage @ weights.weights[part].toarray()
    return sums + weights.offsets[None, :]


def ray_scores(genotypes: GenotypeSet, weights: WeightMatrix, settings: RunSettings) -> np.ndarray:
    blocks = plan_blocks(genotypes, weights, settings.variants_per_block)
    layouts = block_layouts(genotypes, blocks)
    means, _ = variant_means(genotypes, blocks, settings, layouts)
    sums = np.zeros((genotypes.n_samples, weights.n_scores))
    for block in score_sample_blocks(genotypes, weights, blocks, means, settings, layouts):
        sums[block.start : block.stop] = block.sums
    return sums


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--variants", type=int, default=100_000)
    parser.add_argument("--scores", type=int, default=100)
    parser.add_argument("--variants-per-score", type=int, default=20_000)
    parser.add_argument("--missing-rate", type=float, default=0.005)
    parser.add_argument("--variants-per-block", type=int, default=2048)
    parser.add_argument("--memory-mb", type=int, default=256)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each path (the best is compared)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where the synthetic fileset goes (default: a temp dir)")
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--quick", action="store_true", help="smoke size: 500 samples x 5k variants x 10 scores")
    return parser


def _timed(function, repeats: int) -> tuple[list[float], np.ndarray]:
    """Seconds of each run (the first Ray run includes starting its worker processes) and the result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(round(time.perf_counter() - start, 3))
    return times, result


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.samples, args.variants, args.scores, args.variants_per_score, args.repeats = 500, 5_000, 10, 1_000, 1
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="prs_bench_"))
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    synthetic = write_genotypes_and_scores(
        workdir,
        [f"S{i:07d}" for i in range(args.samples)],
        rng.uniform(0.05, 0.95, args.variants),
        rng.normal(size=(args.samples, args.scores)),
        args.seed,
        variants_per_score=args.variants_per_score,
        missing_rate=args.missing_rate,
    )
    generate_s = time.perf_counter() - started

    started = time.perf_counter()
    config = ScorePrsConfig(
        genotypes=str(synthetic.bed), scores=[str(p) for p in synthetic.scoring_files], out=str(workdir / "out")
    )
    genotypes = open_genotypes(config.genotypes)
    matches, refusals = match_all(load_scores(config.scores), genotypes, config)
    if refusals:
        raise SystemExit(f"benchmark scores refused: {refusals[:3]}")
    weights = build_weight_matrix(matches)
    match_s = time.perf_counter() - started

    numpy_times, reference = _timed(lambda: numpy_scores(genotypes, weights, args.variants_per_block), args.repeats)
    if not ray.is_initialized():
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    settings = RunSettings(variants_per_block=args.variants_per_block, memory_mb=args.memory_mb)
    ray_times, scored = _timed(lambda: ray_scores(genotypes, weights, settings), args.repeats)
    numpy_s, ray_s = min(numpy_times), min(ray_times)
    max_diff = float(np.abs(scored - reference).max())
    equal = bool(np.allclose(scored, reference, rtol=1e-9, atol=1e-9))

    work = len(weights.targets) * genotypes.n_samples * weights.n_scores
    markdown = (
        f"| path | seconds | variants x samples x scores / s |\n|---|---|---|\n"
        f"| numpy, single process | {numpy_s:.2f} | {work / numpy_s:.3g} |\n"
        f"| Ray Data ({args.num_cpus} CPUs) | {ray_s:.2f} | {work / ray_s:.3g} |\n\n"
        f"{len(weights.targets)} scored variants x {genotypes.n_samples} samples x {weights.n_scores} "
        f"scores; Ray/numpy speed ratio {numpy_s / ray_s:.2f}; results equal: {equal} "
        f"(max |diff| {max_diff:.2e})"
    )
    results = {
        "benchmark": "prs_scoring",
        "shape": {
            "samples": genotypes.n_samples,
            "variants": args.variants,
            "scored_variants": len(weights.targets),
            "scores": weights.n_scores,
            "weights_nonzero": int(weights.weights.nnz),
            "missing_rate": args.missing_rate,
        },
        "settings": {
            "variants_per_block": args.variants_per_block,
            "memory_mb": args.memory_mb,
            "ray_num_cpus": args.num_cpus,
            "repeats": args.repeats,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "note": args.note,
        },
        "seconds": {
            "generate": round(generate_s, 3),
            "match": round(match_s, 3),
            "numpy_single_process": numpy_s,
            "ray_data": ray_s,
            "numpy_runs": numpy_times,
            "ray_data_runs": ray_times,
        },
        "throughput_vxsxk_per_s": {"numpy_single_process": work / numpy_s, "ray_data": work / ray_s},
        "ray_vs_numpy_speedup": numpy_s / ray_s,
        "results_equal": equal,
        "max_abs_difference": max_diff,
        "markdown": markdown,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"{markdown}; generate {generate_s:.1f}s, match {match_s:.1f}s")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
