"""`ehrfm synthesize`: a synthetic biobank (OMOP CDM v5.4 + PRS) with a known generative truth.

The cohort is built in chunks of persons. Chunk i draws from its own random streams seeded by
(seed, i) and writes its own part files, so the output does not depend on how chunks are
scheduled: sequentially in this process, or as Ray tasks with `--ray`. Same seed, same bytes.
Layout (see notes/CONTRACTS.md): omop/<table>/part-*.parquet|csv, prs/ (pgsc_calc, plink2,
wide parquet, sample map, PCs), truth/ (never read by the pipeline), manifest.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ehrfm.config import dump_config, load_config, parse_config
from ehrfm_synthetic import concepts as cc
from ehrfm_synthetic.clinical import diagnose, visit_state
from ehrfm_synthetic.disease import simulate_diseases
from ehrfm_synthetic.events import conditions, drugs, observations, procedures
from ehrfm_synthetic.figures import cohort_figures
from ehrfm_synthetic.measurements import measurements
from ehrfm_synthetic.omop import CLINICAL_TABLES, part_path, write_table
from ehrfm_synthetic.params import SynthConfig
from ehrfm_synthetic.population import draw_population
from ehrfm_synthetic.prs import PRSWriters, chunk_scores, pgs_catalog
from ehrfm_synthetic.rows import (
    death_rows,
    event_rows,
    observation_period_rows,
    person_rows,
    visit_rows,
)  # fmt: skip
from ehrfm_synthetic.truth import truth_rows
from ehrfm_synthetic.visits import observation_window, simulate_visits

ID_STRIDE = 10**10  # event ids of chunk i are (i + 1) * ID_STRIDE + row
_OUTPUTS = ("omop", "prs", "genotypes", "truth", "manifest.json")


def n_chunks(config: SynthConfig) -> int:
    return (config.persons + config.chunk_size - 1) // config.chunk_size


def generate_chunk(config_data: dict[str, Any], chunk: int) -> dict[str, Any]:
    """Simulate persons [chunk * chunk_size, ...) and write their part files; return row counts."""
    config = SynthConfig.model_validate(config_data)
    out, params = Path(config.out), config.model
    first = chunk * config.chunk_size
    global_index = np.arange(first, min(first + config.chunk_size, config.persons), dtype=np.int64)
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence([config.seed, chunk]).spawn(12)]
    pop = draw_population(streams[0], global_index, config.seed, config.genotyped_fraction, params.genetics)
    hist = simulate_diseases(pop, params, streams[1])
    window = observation_window(pop, hist)
    visits = simulate_visits(pop, hist, window, params.visits, streams[2])
    state = visit_state(pop, hist, visits)
    dx = diagnose(pop, hist, visits, state, params.coding, streams[3])
    pools = cc.tail_pools(config.seed)

    base = (chunk + 1) * ID_STRIDE
    events = {
        "condition_occurrence": conditions(pop, hist, state, dx, pools, streams[4]),
        "drug_exposure": drugs(pop, state, dx, pools, streams[5]),
        "procedure_occurrence": procedures(state, dx, pools, streams[6]),
        "measurement": measurements(pop, state, dx, pools, streams[7]),
        "observation": observations(state, pools, streams[8]),
    }
    tables = {
        "person": person_rows(pop),
        "observation_period": observation_period_rows(pop, window, base),
        "visit_occurrence": visit_rows(pop, visits, base),
        **{name: event_rows(name, ev, pop, visits, base, base, streams[9]) for name, ev in events.items()},
        "death": death_rows(pop, hist, window, visits, streams[10]),
    }
    for name, table in tables.items():
        write_table(table, part_path(out, name, chunk, config.format), config.format)
    (out / "truth" / "persons").mkdir(parents=True, exist_ok=True)
    pq.write_table(truth_rows(pop, hist, window, visits, dx), out / "truth" / "persons" / f"part-{chunk:05d}.parquet")
    catalog = pgs_catalog(config.num_pgs, config.seed, params.prs)
    scores = chunk_scores(pop, catalog, params.prs, streams[11])
    (out / "prs" / "_parts").mkdir(parents=True, exist_ok=True)
    pq.write_table(scores, out / "prs" / "_parts" / f"part-{chunk:05d}.parquet")
    return {"chunk": chunk, "rows": {name: t.num_rows for name, t in tables.items()}, "genotyped": scores.num_rows}


def _run_chunks(config: SynthConfig) -> list[dict[str, Any]]:
    data = config.model_dump(mode="json")
    if not config.ray:
        return [generate_chunk(data, i) for i in range(n_chunks(config))]
    import ray

    if not ray.is_initialized():
        ray.init()  # joins the cluster named by RAY_ADDRESS, or starts a local one
    task = ray.remote(num_cpus=1)(generate_chunk)
    window = max(1, int(ray.cluster_resources().get("CPU", 1)) * 2)  # bounded work in flight
    pending, done = [], []
    for i in range(n_chunks(config)):
        pending.append(task.remote(data, i))
        if len(pending) >= window:
            ready, pending = ray.wait(pending, num_returns=1)
            done.extend(ray.get(ready))
    done.extend(ray.get(pending))
    return sorted(done, key=lambda s: s["chunk"])


def _prepare_out(out: Path) -> None:
    """Create `out`, or clear a previous cohort there; refuse to clobber anything else."""
    if out.exists() and any(out.iterdir()):
        if not (out / "manifest.json").exists() and not (out / "truth").exists():
            raise FileExistsError(f"{out} is not empty and holds no synthetic cohort; choose another --out")
        for name in _OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _assemble_prs(config: SynthConfig, out: Path) -> int:
    catalog = pgs_catalog(config.num_pgs, config.seed, config.model.prs)
    writers = PRSWriters(out / "prs", catalog.pgs_ids)
    parts = sorted((out / "prs" / "_parts").glob("part-*.parquet"))
    try:
        for part in parts:
            writers.add(pq.read_table(part))
    finally:
        writers.close()
    shutil.rmtree(out / "prs" / "_parts")
    pq.write_table(catalog.to_table(), out / "truth" / "pgs.parquet")
    return writers.samples


def synthesize(config: SynthConfig, with_figures: bool = True) -> dict[str, Any]:
    """Write the cohort described by `config`; return the manifest (also written to manifest.json)."""
    out = Path(config.out)
    _prepare_out(out)
    write_table(cc.concept_table(), part_path(out, "concept", 0, config.format), config.format)
    summaries = _run_chunks(config)
    genotyped = _assemble_prs(config, out)
    if config.prs_source == "genotypes":
        from ehrfm_synthetic.genotypes import emit_cohort_genotypes

        emit_cohort_genotypes(out, config.seed, config.genotype_variants)
    (out / "truth" / "params.json").write_text(json.dumps(config.model.model_dump(mode="json"), indent=1) + "\n")
    rows = {t: sum(s["rows"][t] for s in summaries) for t in CLINICAL_TABLES}
    rows["concept"] = cc.concept_table().num_rows
    manifest: dict[str, Any] = {
        "generator": "ehrfm_synthetic.cohort",
        "seed": config.seed,
        # where it was written and how chunks were scheduled do not change a byte of the cohort
        "config": config.model_dump(mode="json", exclude={"out", "ray"}),
        "chunks": len(summaries),
        "rows": rows,
        "genotyped": genotyped,
        "num_pgs": config.num_pgs,
    }
    if with_figures:  # NaN (e.g. no eligible person in a tiny cohort) is written as null
        figures = cohort_figures(out, config.horizon_days, config.seed)
        manifest["figures"] = {
            k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in figures.items()
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def parse_args(argv: list[str]) -> SynthConfig:
    parser = argparse.ArgumentParser(prog="ehrfm synthesize", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file of SynthConfig fields (e.g. jobs/configs/synthetic-default.yaml)")
    parser.add_argument("--persons", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out")
    parser.add_argument("--num-pgs", dest="num_pgs", type=int)
    parser.add_argument("--format", choices=["parquet", "csv"])
    parser.add_argument("--genotyped-fraction", dest="genotyped_fraction", type=float)
    parser.add_argument("--chunk-size", dest="chunk_size", type=int)
    parser.add_argument("--ray", action="store_true", default=None, help="run chunks as Ray tasks")
    parser.add_argument(
        "--prs-source",
        dest="prs_source",
        choices=["scores", "genotypes"],
        help="genotypes: write PLINK genotypes + PGS Catalog scoring files instead of scores",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. model.hazards.t2d.genetic=1.0")  # fmt: skip
    args = parser.parse_args(argv)
    flags = {name: name for name in SynthConfig.model_fields if name in vars(args)}  # --num-pgs is num_pgs=...
    return parse_config(parser, SynthConfig, args, flags, overrides="set", base=SynthConfig().model_dump(mode="json"))


def load_synth_config(path: str | None = None, overrides: list[str] | None = None) -> SynthConfig:
    """Defaults, then the YAML file, then `key.path=value` overrides, merged key by key.

    (Merged onto the defaults so that `model.hazards.t2d.genetic=1.5` keeps the other t2d
    coefficients; unknown keys are still rejected by the strict models.)
    """
    return load_config(SynthConfig, path, overrides, base=SynthConfig().model_dump(mode="json"))


def main(argv: list[str]) -> int:
    config = parse_args(argv)
    manifest = synthesize(config)
    print(dump_config(config).split("model:")[0].rstrip())
    print("rows: " + ", ".join(f"{t}={n}" for t, n in manifest["rows"].items()))
    print(f"genotyped samples: {manifest['genotyped']} with {config.num_pgs} PGS")
    for key, value in manifest["figures"].items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")  # counts, or null
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
