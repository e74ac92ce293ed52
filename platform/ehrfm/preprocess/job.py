"""`ehrfm preprocess`: OMOP CDM (or MEDS) + PRS -> a MEDS dataset -> PRS z-scores -> tokenized timelines.

One Ray Data graph per step (stages.py; the task functions in ray_tasks.py),
streaming, with no step that holds the dataset in one process:
 1. person and death are validated in the driver (small) -> PersonIndex, put in the object store.
 2. only when two files of a table may share a primary key: their kept keys are grouped by a key
    bucket (hash shuffle) to find cross-file duplicates exactly (see ingest.py).
 3. ingest + events: one task per OMOP file validates it batch by batch (quarantine + row
    account), maps kept rows to events and tags each with its shard, a hash of subject_id; each
    shard's events are gathered, sorted and written as data/<split>/part-S.parquet, the MEDS
    dataset's files (meds.DataSchema-valid, split by subject: train/tuning/held_out; static codes
    with a null time; ehrfm.meds.writer). Gathered either by a groupby on the shard (a Ray
    shuffle) or, with shuffle_strategy=shard_files, through per-shard files the ingest tasks
    write under the temp directory, read back by one task per shard (no object-store traffic).
 4. PRS in the driver (K floats per person): validated, z-scored / ancestry-adjusted on the train
    split -> prs/part-S.parquet (same shards) and prs/pgs_ids.json.
 5. tokenizer fit on train persons only: code counts come back from the shard writers, value-bin
    edges from a groupby on code over the train values -> tokenizer.json.
 6. timelines: one task per shard -> timelines/part-S.parquet + timelines/manifest.json.
 7. report.json, metadata/ (codes.parquet, dataset.json, subject_splits.parquet), quarantine/;
    all written under a hidden temp directory beside OUT, which replaces OUT by a rename only
    when everything succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ehrfm.config import add_config_arguments, dump_config, parse_config
from ehrfm.constants import FIRST_CODE_ID, SPECIAL_TOKENS, SPLITS
from ehrfm.meds.reader import preflight_meds, subject_split_codes
from ehrfm.meds.writer import write_metadata
from ehrfm.omop.files import OmopSchemaError
from ehrfm.omop.readability import preflight_omop
from ehrfm.omop.validation import find_tables
from ehrfm.preprocess import ray_tasks as tasks
from ehrfm.preprocess import stages as stages
from ehrfm.preprocess.config import PreprocessConfig
from ehrfm.preprocess.report import log_to_mlflow, percentiles, summary_lines
from ehrfm.prs.person import PersonPrs, PrsInputs, build_person_prs, write_prs
from ehrfm.prs.readers import PrsFormatError, check_build, read_prs
from ehrfm.splits import shard_of

TIMELINES_FORMAT = "ehrfm-timelines/1"


@dataclass
class PreprocessInputs:
    """Where the data come from: an OMOP root or a MEDS dataset, plus optional PRS files."""

    omop: str | None = None
    meds: str | None = None
    prs: str | None = None
    sample_map: str | None = None
    pcs: str | None = None

    @classmethod
    def from_cohort(cls, cohort: str | Path) -> PreprocessInputs:
        """The layout `ehrfm synthesize` writes: omop/ and prs/ (wide parquet, sample map, PCs)."""
        root = Path(cohort)
        prs_dir = root / "prs"
        prs = next(
            (p for p in (prs_dir / "scores_wide.parquet", prs_dir / "aggregated_scores.txt.gz") if p.is_file()), None
        )
        return cls(
            omop=str(root / "omop"),
            prs=str(prs) if prs else None,
            sample_map=str(prs_dir / "sample_map.tsv") if (prs_dir / "sample_map.tsv").is_file() else None,
            pcs=str(prs_dir / "pcs.tsv") if (prs_dir / "pcs.tsv").is_file() else None,
        )


# ---- atomic output ------------------------------------------------------------------------------
@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yield a hidden temp directory beside `out`; on success it replaces `out` by rename.

    A failed or killed run leaves only the hidden `.NAME.tmp-*` directory (removed on failure
    when possible), never a partial `out` that a later stage could read.
    """
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- helpers ------------------------------------------------------------------------------------
@contextmanager
def data_context(config: PreprocessConfig) -> Iterator[None]:
    """The Ray Data settings of this run (shuffle strategy, progress bars), restored afterwards.

    A failing task raises its own exception, not Ray Data's UserCodeException (whose cause is
    lost on its way to the driver), so input_error() can find an input error raised in a task.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.shuffle_strategy, ctx.enable_progress_bars, ctx.raise_original_map_exception)
    ctx.shuffle_strategy = config.ray_shuffle_strategy
    ctx.raise_original_map_exception = True
    if not config.progress_bars:
        ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ctx.shuffle_strategy, ctx.enable_progress_bars, ctx.raise_original_map_exception = saved


def default_ray_address() -> str:
    """RAY_ADDRESS when set (a submitted job), else a new local instance: never silently join
    some other `ray start` cluster on the machine (pass --ray-address auto for that)."""
    return os.environ.get("RAY_ADDRESS") or "local"


def check_inputs(inputs: PreprocessInputs) -> None:
    """Fail before any work when a named input is missing (no stage should find out late)."""
    if bool(inputs.omop) == bool(inputs.meds):
        raise ValueError("give exactly one of an OMOP root or a MEDS dataset")
    for flag, path in (
        ("--omop", inputs.omop),
        ("--meds", inputs.meds),
        ("--prs", inputs.prs),
        ("--sample-map", inputs.sample_map),
        ("--pcs", inputs.pcs),
    ):
        if path and "://" not in path and not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path} does not exist")
    if (inputs.sample_map or inputs.pcs) and not inputs.prs:
        raise ValueError("--sample-map and --pcs need --prs")


def _input_files(inputs: PreprocessInputs) -> list[str]:
    files: list[str] = []
    if inputs.omop:
        for table_files in find_tables(inputs.omop).values():
            files += table_files
    if inputs.meds:
        files += stages.meds_files(Path(inputs.meds))
    files += [f for f in (inputs.prs, inputs.sample_map, inputs.pcs) if f]
    return sorted(f for f in files if "://" not in f)


def _token_report(timelines: pa.Table) -> tuple[dict, dict, list[dict]]:
    stats = [json.loads(s) for s in timelines["stats"].to_pylist()] if timelines.num_rows else []
    lengths = timelines["lengths"].combine_chunks().flatten().to_numpy() if stats else np.zeros(0, np.int64)
    splits = {name: sum(s["subjects_by_split"][name] for s in stats) for name in SPLITS}
    tokens = {
        "total": int(lengths.sum()),
        "per_person": percentiles(lengths),
        "mean_per_person": float(lengths.mean()) if len(lengths) else 0.0,
        "unk_tokens": sum(s["unk_tokens"] for s in stats),
        "unk_tokens_by_split": {n: sum(s["unk_tokens_by_split"][n] for s in stats) for n in SPLITS},
        "value_tokens": sum(s["value_tokens"] for s in stats),
        "gap_tokens": sum(s["gap_tokens"] for s in stats),
    }
    shards = [
        {"file": f"part-{shard:05d}.parquet", "persons": s["subjects"], "tokens": s["tokens"], "sha256": sha}
        for shard, s, sha in zip(timelines["shard"].to_pylist(), stats, timelines["sha256"].to_pylist())
    ]
    return splits, tokens, shards


def run_preprocess(
    config: PreprocessConfig, inputs: PreprocessInputs, out: str | Path, ray_address: str | None = None
) -> dict:
    """Run every stage into a temp directory, then move it to `out`; returns the report.

    The inputs are checked (names, then every OMOP file's readability and header) before Ray
    starts: a broken file fails here in a second, not inside a task.
    """
    import ray

    check_inputs(inputs)
    warnings = preflight_omop(inputs.omop).warnings if inputs.omop else []
    if inputs.meds:  # refused here when no subject has MEDS_BIRTH; the dataset's own splits are kept
        meds_check = preflight_meds(inputs.meds, stages.meds_files(Path(inputs.meds)))
        warnings += meds_check.warnings
        if meds_check.splits_file and not config.splits.subject_splits:
            splits = config.splits.model_copy(update={"subject_splits": meds_check.splits_file})
            config = config.model_copy(update={"splits": splits})
    if inputs.prs:  # refused here, before Ray starts, rather than after the events (read again there)
        check_build(inputs.prs, config.prs.build)
        read_prs(inputs.prs, column=config.prs.column, sampleset=config.prs.sampleset)
    if not ray.is_initialized():
        ray.init(address=ray_address or default_ray_address())
    # hashing releases the GIL: one driver thread checksums the inputs while the stages run
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
    try:
        files = _input_files(inputs) if config.checksum_inputs else []
        checksums = {f: hasher.submit(tasks.file_sha256, f) for f in files}
        with data_context(config), atomic_directory(Path(out)) as tmp:
            report = _run_stages(config, inputs, tmp, checksums, warnings)
    finally:
        hasher.shutdown(wait=False, cancel_futures=True)
    log_to_mlflow(
        report, {**_flatten(config.model_dump(mode="json")), "tokenizer_version": report["tokenizer"]["version"]}
    )
    return report


def _dataset_name(inputs: PreprocessInputs) -> str:
    """The input directory's name (its parent's for a cohort's `omop/`), for metadata/dataset.json."""
    source = Path(str(inputs.omop or inputs.meds).rstrip("/"))
    return source.parent.name if source.name.lower() in ("omop", "data") and source.parent.name else source.name


def _run_stages(
    config: PreprocessConfig, inputs: PreprocessInputs, tmp: Path, checksums: dict, warnings: list[str]
) -> dict:
    timer = stages.Timer()
    stage = stages.omop_events if inputs.omop else stages.meds_events
    events = stage(inputs.omop or inputs.meds, config, tmp, timer)
    subjects, n_shards = events.subjects, events.n_shards
    person_split = subject_split_codes(subjects, config.splits.ratios, config.splits.salt, config.splits.subject_splits)
    with timer.stage("prs"):
        if inputs.prs:
            prs_inputs = PrsInputs(
                inputs.prs,
                inputs.sample_map,
                inputs.pcs,
                config.prs.column,
                config.prs.sampleset,
                config.prs.adjust_ancestry,
                config.prs.build,
            )
            person_prs = build_person_prs(
                prs_inputs, subjects, person_split, tmp / "quarantine" / "prs_samples.parquet"
            )
        else:
            person_prs = PersonPrs.empty(subjects)
        write_prs(tmp / "prs", person_prs, shard_of(subjects, n_shards), n_shards)
    with timer.stage("tokenizer_fit"):
        tok = stages.fit_tokenizer(tmp, events, config)
        tok.save(tmp / "tokenizer.json")
    with timer.stage("timelines"):
        timelines = stages.build_timelines(
            tmp, tok, len(person_prs.pgs_ids), [s["shard"] for s in events.shards], config
        )
    splits, tokens, timeline_shards = _token_report(timelines)
    metadata = write_metadata(
        tmp,
        events.codebook,
        events.codes,
        subjects,
        person_split,
        ancestors=events.ancestors,
        dataset_name=_dataset_name(inputs),
    )
    manifest = {
        "format": TIMELINES_FORMAT,
        "vocab_size": tok.vocab_size,
        "num_pgs": len(person_prs.pgs_ids),
        "pgs_ids": person_prs.pgs_ids,
        "tokenizer_version": tok.version,
        "tokenizer_file": "../tokenizer.json",
        "special_tokens": SPECIAL_TOKENS,
        "first_code_id": FIRST_CODE_ID,
        "counts": {
            "persons": int(len(subjects)),
            "persons_by_split": splits,
            "events": events.events,
            "tokens": tokens["total"],
            "persons_with_prs": int(person_prs.has_prs.sum()),
        },
        "token_statistics": tokens,
        "splits": {"ratios": dict(zip(SPLITS, config.splits.ratios)), "salt": config.splits.salt},
        "shards": timeline_shards,
        "input_checksums": {"sha256": {f: future.result() for f, future in checksums.items()}},
    }
    (tmp / "timelines" / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(tmp / "_work", ignore_errors=True)
    (tmp / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    prs_report = {
        "persons": int(len(subjects)),
        "persons_with_prs": int(person_prs.has_prs.sum()),
        "pgs": len(person_prs.pgs_ids),
        **person_prs.report,
    }
    report = {
        "inputs": {k: v for k, v in asdict(inputs).items() if v},
        "tables": events.tables,
        "plausibility": events.plausibility,  # the date rules applied (extraction date and its source)
        "totals": {
            key: sum(a[key] for a in events.tables.values()) for key in ("rows_in", "rows_kept", "rows_quarantined")
        },
        "events": {
            "events": events.events,
            "subjects": int(len(subjects)),
            "shards": n_shards,
            "files": events.shards,
            "meds": metadata,
        },
        "splits": splits,
        "tokens": tokens,
        "tokenizer": {"version": tok.version, "vocab_size": tok.vocab_size, **tok.fit_summary},
        "prs": prs_report,
        "warnings": warnings,
        "seconds": timer.total(),
    }
    (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (tmp / "summary.txt").write_text("\n".join(summary_lines(report)) + "\n", encoding="utf-8")
    return report


INPUT_ERRORS = (OmopSchemaError, PrsFormatError, FileNotFoundError, ValueError)


_WRAPPER_MODULES = ("ray", "pyarrow")  # Ray's wrappers; pyarrow errors (ArrowInvalid is a ValueError) may quote cells


def input_error(exc: BaseException) -> BaseException | None:
    """The input error behind `exc`: itself, or the original exception of a failed Ray task
    (RayTaskError.cause, a Ray Data wrapper's cause), following causes, contexts and exception
    arguments breadth-first; None when it is not an input error."""
    seen: set[int] = set()
    pending: list[object] = [exc]
    while pending:
        current = pending.pop(0)
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, INPUT_ERRORS) and not type(current).__module__.startswith(_WRAPPER_MODULES):
            return current
        pending += [getattr(current, "cause", None), current.__cause__, current.__context__, *current.args]
    return None


def one_line(exc: BaseException) -> str:
    """An input error's message on one line: its first (Ray Data appends retry advice on the
    next lines of an exception raised in a task; ehrfm's own messages are one line)."""
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


def _flatten(data: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# ---- command line -------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ehrfm preprocess", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--omop", help="OMOP CDM root (csv/parquet tables, local path or filesystem URI)")
    source.add_argument("--meds", help="MEDS dataset (data/*.parquet) in place of OMOP")
    source.add_argument("--cohort", help="a cohort directory from `ehrfm synthesize` (omop/ + prs/)")
    parser.add_argument("--prs", help="PRS file: pgsc_calc aggregated scores, plink2 .sscore or wide table")
    parser.add_argument("--sample-map", help="sample_id<TAB>person_id (without it, sample ids are person ids)")
    parser.add_argument("--pcs", help="genetic PCs (sample_id PC1..PCn) for ancestry adjustment")
    parser.add_argument("--out", required=True, help="output directory (replaced atomically)")
    add_config_arguments(parser, "PreprocessConfig (jobs/configs/preprocess-default.yaml)")
    parser.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join ('auto': the running local one; default: RAY_ADDRESS, else a new local instance)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    config = parse_config(parser, PreprocessConfig, args)
    inputs = (
        PreprocessInputs.from_cohort(args.cohort) if args.cohort else PreprocessInputs(omop=args.omop, meds=args.meds)
    )
    for name in ("prs", "sample_map", "pcs"):
        if getattr(args, name):
            setattr(inputs, name, getattr(args, name))
    import ray

    owns_ray = not ray.is_initialized()  # started here (not by a caller): shut down here, not at teardown
    try:
        report = run_preprocess(config, inputs, args.out, ray_address=args.ray_address)
    except Exception as exc:  # noqa: BLE001 - an input error raised inside a Ray task arrives wrapped
        cause = input_error(exc)
        if cause is None:
            raise
        print(f"ehrfm preprocess: {one_line(cause)}", file=sys.stderr)
        return 2
    finally:
        if owns_ray and ray.is_initialized():
            ray.shutdown()
    print("\n".join(summary_lines(report)))
    for warning in report["warnings"]:
        print(f"WARNING: {warning}")
    print(f"outputs: {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
