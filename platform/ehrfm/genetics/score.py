"""`ehrfm score_prs`: polygenic scores from PLINK 1 genotypes and PGS Catalog scoring files.

    ehrfm score_prs --genotypes PREFIX_OR_GLOB --scores FILES_OR_DIR... --out DIR [--build GRCh38]

Steps: parse the scoring files (pgs_catalog), match their variants to the .bim by position and
alleles as pgsc_calc does (variant_match), refuse scores below the minimum match rate, then sum
weights x mean-imputed dosages on Ray Data over variant and sample blocks (prs_ray). Writes
OUT/aggregated_scores.txt.gz (pgsc_calc long format), OUT/match_report.json (counts per score)
and OUT/match_log.parquet (one row per scoring-file row). No sample-level value is logged.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Literal

import ray

from ehrfm.config import StrictModel
from ehrfm.genetics.genotypes import GenotypeSet, open_genotypes
from ehrfm.genetics.kernel import denominators
from ehrfm.genetics.output import AggregatedScoresWriter, write_match_log, write_report
from ehrfm.genetics.pgs_catalog import Score, find_scoring_files, read_scoring_file
from ehrfm.genetics.ray_scoring import RunSettings, block_layouts, score_sample_blocks, variant_means
from ehrfm.genetics.variant_match import MatchOptions, ScoreMatch, match_score, prepare_target, refusal_message
from ehrfm.genetics.weights import build_weight_matrix, plan_blocks


class ScorePrsConfig(StrictModel):
    genotypes: str
    scores: list[str]
    out: str
    build: Literal["GRCh37", "GRCh38"] | None = None  # target build; scoring files on another build are refused
    sampleset: str = "cohort"
    min_match_rate: float = 0.75
    keep_ambiguous: bool = False
    keep_multiallelic: bool = False
    denominator: Literal["per-score", "shared"] = "per-score"
    drop_failing_scores: bool = False
    variants_per_block: int = 2048
    samples_per_block: int = 0
    memory_mb: int = 256


class PrsMatchError(RuntimeError):
    """Scores refused (match rate, genome build); the match report was written before raising."""


def load_scores(specs: list[str]) -> list[Score]:
    """Every score in the named files; two scores with one id is an error naming both files."""
    scores: list[Score] = []
    seen: dict[str, str] = {}
    for path in find_scoring_files(list(specs)):
        for score in read_scoring_file(path):
            if score.score_id in seen:
                raise ValueError(
                    f"score id {score.score_id!r} appears in both {seen[score.score_id]} and "
                    f"{score.source}; pass one of them"
                )
            seen[score.score_id] = score.source
            scores.append(score)
    return scores


def _build_refusal(score: Score, build: str | None) -> str | None:
    if build and score.genome_build and score.genome_build != build:
        return (
            f"score {score.score_id} ({score.source}): positions are on {score.genome_build}, genotypes on "
            f"{build}; use the scoring file harmonised to {build} (no liftover here)"
        )
    return None


def match_all(
    scores: list[Score], genotypes: GenotypeSet, config: ScorePrsConfig
) -> tuple[list[ScoreMatch], list[str]]:
    """Match every score; returns the matches and the refusal messages of refused scores."""
    target = prepare_target(genotypes.variants)
    options = MatchOptions(config.keep_ambiguous, config.keep_multiallelic, config.min_match_rate)
    matches, refusals = [], []
    for score in scores:
        match = match_score(score, target, options)
        build_problem = _build_refusal(score, config.build)
        match.summary["build_check"] = (
            "refused"
            if build_problem
            else "unverified"
            if config.build and not score.genome_build
            else "ok"
            if config.build
            else "not_requested"
        )
        if build_problem:
            match.summary["passed"] = False
            refusals.append(build_problem)
        elif not match.passed:
            refusals.append(refusal_message(match.summary))
        match.summary["refusal"] = build_problem or (None if match.passed else refusals[-1])
        matches.append(match)
    return matches, refusals


def compute_prs(config: ScorePrsConfig) -> dict:
    """Run the whole command (Ray must be initialised); returns the report also written to OUT."""
    started = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    scores = load_scores(config.scores)
    genotypes = open_genotypes(config.genotypes)
    matches, refusals = match_all(scores, genotypes, config)
    report = {
        "sampleset": config.sampleset,
        "genotypes": {
            "filesets": [Path(f.bed).name for f in genotypes.filesets],
            "n_samples": genotypes.n_samples,
            "n_variants": len(genotypes.variants),
        },
        "target_build": config.build,
        "options": config.model_dump(exclude={"genotypes", "scores", "out"}),
        "scores": [m.summary for m in matches],
        "refused": refusals,
    }
    write_match_log(out, [m.log for m in matches])
    passing = [m for m in matches if m.summary["passed"]]
    if refusals and (not config.drop_failing_scores or not passing):
        report["scored"] = []
        write_report(out, report)
        raise PrsMatchError(
            "refused "
            + "; ".join(refusals)
            + ("" if config.drop_failing_scores else " (--drop-failing-scores scores the others)")
        )
    weights = build_weight_matrix(passing)
    settings = RunSettings(config.variants_per_block, config.samples_per_block, config.memory_mb)
    blocks = plan_blocks(genotypes, weights, config.variants_per_block)
    layouts = block_layouts(genotypes, blocks)
    means, uncalled = variant_means(genotypes, blocks, settings, layouts)
    writer = AggregatedScoresWriter(
        out,
        config.sampleset,
        weights.score_ids,
        genotypes.sample_ids,
        denominators(weights.weights, config.denominator == "per-score"),
    )
    for block in score_sample_blocks(genotypes, weights, blocks, means, settings, layouts):
        writer.write(block)
    writer.finish()
    report.update(
        {
            "scored": weights.score_ids,
            "n_scored_variants": len(weights.targets),
            "n_variant_blocks": len(blocks),
            "variants_without_calls": uncalled,
            "samples_with_missing_genotypes": writer.samples_with_missing,
            "missing_genotypes_imputed": writer.missing_genotypes,
            "denominator": config.denominator,
            "rows_written": writer.rows_written,
            "seconds": round(time.perf_counter() - started, 3),
        }
    )
    write_report(out, report)
    return report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ehrfm score_prs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--genotypes", required=True, help="PLINK 1 prefix, .bed path, directory or glob")
    parser.add_argument("--scores", required=True, nargs="+", help="scoring files, directories or globs")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--build", choices=["GRCh37", "GRCh38"], help="genome build of the genotypes")
    parser.add_argument("--sampleset", default="cohort", help="sampleset column of the output")
    parser.add_argument("--min-match-rate", type=float, default=0.75, help="refuse scores matching fewer rows")
    parser.add_argument("--keep-ambiguous", action="store_true", help="score A/T and C/G SNPs too")
    parser.add_argument("--keep-multiallelic", action="store_true", help="score positions with several variants")
    parser.add_argument(
        "--denominator",
        choices=["per-score", "shared"],
        default="per-score",
        help="DENOM over each score's variants, or over all scored variants as one plink2 run",
    )
    parser.add_argument("--drop-failing-scores", action="store_true", help="score the others when some are refused")
    parser.add_argument("--variants-per-block", type=int, default=2048)
    parser.add_argument("--samples-per-block", type=int, default=0, help="0: from --memory-mb")
    parser.add_argument("--memory-mb", type=int, default=256, help="memory of one work unit")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k != "num_cpus"}
    config = ScorePrsConfig.model_validate(values)
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            **({} if address else {"num_cpus": args.num_cpus}),
        )
    try:
        report = compute_prs(config)
    except PrsMatchError as error:
        print(f"score_prs: {error}", file=sys.stderr)
        return 2
    print(
        f"score_prs: {len(report['scored'])} score(s) x {report['genotypes']['n_samples']} samples over "
        f"{report['n_scored_variants']} variants -> {Path(config.out) / 'aggregated_scores.txt.gz'}"
    )
    return 0
