"""`ehrfm preprocess`: OMOP CDM (or MEDS) + PRS -> MEDS events -> PRS z-scores -> tokenized timelines.

One Ray Data graph per step, streaming, with no step that holds the dataset in one process:
 1. person and death are validated in the driver (small) -> PersonIndex, put in the object store.
 2. only when two files of a table may share a primary key: their kept keys are grouped by a key
    bucket (hash shuffle) to find cross-file duplicates exactly (see ingest.py).
 3. ingest + events: one task per OMOP file validates it batch by batch (quarantine + row
    account), maps kept rows to events and tags each with its subject's shard; a groupby on the
    shard (hash-partitioned shuffle) gathers each shard, which is sorted and written as
    events/part-S.parquet (meds.DataSchema-valid).
 4. PRS in the driver (K floats per person): validated, z-scored / ancestry-adjusted on the train
    split -> prs/part-S.parquet (same shards) and prs/pgs_ids.json.
 5. tokenizer fit on train persons only: code counts (groupby code) and value-bin edges (groupby
    code) -> tokenizer.json.
 6. timelines: one task per shard -> timelines/part-S.parquet + timelines/manifest.json.
 7. report.json, splits.parquet, quarantine/; all written under a hidden temp directory beside
    OUT, which replaces OUT by a rename only when everything succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ehrfm.config import dump_config, load_config
from ehrfm.data import pipeline_tasks as tasks
from ehrfm.data.events import SHARD_COLUMN, death_events, person_events
from ehrfm.data.ingest import IngestContext, duplicates_by_unit, plan_units, table_accounts, tables_needing_key_check
from ehrfm.data.omop import PersonIndex, find_tables, validate_table
from ehrfm.data.omop_io import OmopSchemaError, file_name
from ehrfm.data.omop_spec import TABLE_ORDER
from ehrfm.data.preprocess_config import PreprocessConfig
from ehrfm.data.preprocess_report import log_to_mlflow, percentiles, summary_lines
from ehrfm.data.prs import PrsFormatError
from ehrfm.data.prs_stage import PersonPrs, PrsInputs, build_person_prs, write_prs
from ehrfm.data.schemas import FIRST_CODE_ID, SPECIAL_TOKENS, SPLITS
from ehrfm.data.splits import num_shards_for, shard_of, split_codes
from ehrfm.data.tokenizer import Tokenizer, build_tokenizer

TIMELINES_FORMAT = "ehrfm-timelines/1"
DRIVER_TABLES = ("person", "death")


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
        prs = next((p for p in (prs_dir / "scores_wide.parquet", prs_dir / "aggregated_scores.txt.gz") if p.is_file()), None)
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
def _collect(dataset) -> pa.Table:
    """All (small) output rows of a dataset as one table."""
    parts = [batch for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow")]
    parts = [p for p in parts if p.num_rows]
    return pa.concat_tables(parts) if parts else pa.table({})


def _write_quarantine(directory: Path, table: str, quarantine: pa.Table) -> None:
    if quarantine.num_rows:
        (directory / table).mkdir(parents=True, exist_ok=True)
        pq.write_table(quarantine, directory / table / "00000-all.parquet")


def _meds_files(root: Path) -> list[str]:
    data = root / "data" if (root / "data").is_dir() else root
    files = sorted(str(p) for p in data.rglob("*.parquet") if "metadata" not in p.relative_to(root).parts)
    if not files:
        raise FileNotFoundError(f"MEDS input {root}: no parquet data files")
    return files


@contextmanager
def data_context(config: PreprocessConfig) -> Iterator[None]:
    """The Ray Data settings of this run (shuffle strategy, progress bars), restored afterwards."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.shuffle_strategy, ctx.enable_progress_bars)
    ctx.shuffle_strategy = config.shuffle_strategy
    if not config.progress_bars:
        ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ctx.shuffle_strategy, ctx.enable_progress_bars = saved


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 3)

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": round(time.perf_counter() - self._start, 3)}


# ---- the stages ---------------------------------------------------------------------------------
@dataclass
class EventsResult:
    subjects: np.ndarray  # sorted person ids that have events
    n_shards: int
    tables: dict[str, dict]
    shards: list[dict]
    events: int
    train_code_counts: dict[str, int]


def _shard_events_dataset(dataset, n_shards: int, events_dir: Path, quarantine_dir: Path, meds_input: bool,
                          cfg: PreprocessConfig) -> pa.Table:
    """groupby(shard) -> one sorted events file per shard; returns the per-shard counts."""
    written = dataset.groupby(SHARD_COLUMN, num_partitions=max(1, n_shards)).map_groups(
        tasks.write_event_shard, batch_format="pyarrow",
        fn_kwargs={"events_dir": str(events_dir), "quarantine_dir": str(quarantine_dir), "meds_input": meds_input,
                   "ratios": cfg.splits.ratios, "salt": cfg.splits.salt},
    )
    return _collect(written)


def _omop_events(ray, root: str, cfg: PreprocessConfig, tmp: Path, timer: Timer) -> EventsResult:
    import ray.data

    tables = find_tables(root)
    if "person" not in tables:
        raise OmopSchemaError(f"OMOP root {root} has no person table")
    quarantine_dir, accounts_dir = tmp / "quarantine", tmp / "_work" / "accounts"
    with timer.stage("persons"):
        person = validate_table(tables["person"], "person", None, cfg.batch_rows)
        persons = PersonIndex.from_tables(person.kept)
        death = validate_table(tables["death"], "death", persons, cfg.batch_rows) if "death" in tables else None
        persons = PersonIndex.from_tables(person.kept, death.kept if death else None)
        n_shards = num_shards_for(len(persons), cfg.subjects_per_shard, cfg.min_shards)
        driver_events, driver_counts = person_events(person.kept)
        accounts = {"person": {**person.account, "events": driver_counts.events, "mapping": driver_counts.as_dict()}}
        _write_quarantine(quarantine_dir, "person", person.quarantine)
        if death is not None:
            dead, dead_counts = death_events(death.kept)
            driver_events = pa.concat_tables([driver_events, dead])
            accounts["death"] = {**death.account, "events": dead_counts.events, "mapping": dead_counts.as_dict()}
            _write_quarantine(quarantine_dir, "death", death.quarantine)
        subjects = driver_events["subject_id"].to_numpy()
        driver_events = driver_events.append_column(SHARD_COLUMN, pa.array(shard_of(subjects, n_shards)))

    units = plan_units(tables, skip=DRIVER_TABLES)
    context = IngestContext(persons, n_shards, cfg.batch_rows, str(quarantine_dir), str(accounts_dir))
    flagged = tables_needing_key_check(units)
    if flagged:
        with timer.stage("cross_file_keys"):
            key_units = [asdict(u) for u in units if u.table in flagged]
            context.key_buckets = min(context.key_buckets, len(key_units))
            ref = [ray.put(context)]
            keys = ray.data.from_items(key_units, override_num_blocks=len(key_units)).map_batches(
                tasks.unit_keys_batch, batch_size=1, batch_format="pyarrow", fn_kwargs={"ctx": ref})
            dupes = _collect(keys.groupby("bucket", num_partitions=context.key_buckets).map_groups(
                tasks.duplicate_keys_group, batch_format="pyarrow"))
            context.cross_unit_duplicates = duplicates_by_unit(dupes) if dupes.num_rows else {}
    with timer.stage("ingest_events"):
        ref = [ray.put(context)]
        parts = [ray.data.from_arrow(driver_events)]
        if units:
            parts.insert(0, ray.data.from_items([asdict(u) for u in units], override_num_blocks=len(units)).map_batches(
                tasks.ingest_batch, batch_size=1, batch_format="pyarrow", fn_kwargs={"ctx": ref}))
        staged = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
        (tmp / "events").mkdir()
        shards = _shard_events_dataset(staged, n_shards, tmp / "events", quarantine_dir, False, cfg)
    accounts.update(table_accounts(accounts_dir, units))
    ordered = {t: accounts[t] for t in TABLE_ORDER if t in accounts}
    if flagged:
        for table in flagged:
            ordered[table]["cross_file_key_check"] = True
    return _events_result(shards, n_shards, ordered)


def _events_result(shards: pa.Table, n_shards: int, tables: dict[str, dict]) -> EventsResult:
    rows = shards.sort_by("shard").to_pylist() if shards.num_rows else []
    subjects = np.sort(np.concatenate([np.asarray(r["subject_ids"], dtype=np.int64) for r in rows])) if rows else np.zeros(0, np.int64)
    if len(subjects) and np.any(subjects[1:] == subjects[:-1]):
        raise AssertionError("a subject appears in two event shards")
    summaries = [{"file": f"part-{r['shard']:05d}.parquet", "shard": r["shard"], "events": r["events"],
                  "persons": len(r["subject_ids"]), "rows_in": r["rows_in"], "dropped": json.loads(r["dropped"]),
                  "sha256": r["sha256"]} for r in rows]
    code_counts: dict[str, int] = {}
    for r in rows:
        for code, n in zip(r["train_codes"], r["train_counts"]):
            code_counts[code] = code_counts.get(code, 0) + n
    return EventsResult(subjects, n_shards, tables, summaries, int(sum(r["events"] for r in rows)), code_counts)


def _meds_events(ray, root: str, cfg: PreprocessConfig, tmp: Path, timer: Timer) -> EventsResult:
    import ray.data

    files = _meds_files(Path(root))
    with timer.stage("ingest_events"):
        births = _collect(ray.data.read_parquet(files, columns=["code"]).map_batches(
            tasks.count_births_batch, batch_format="pyarrow"))
        n_shards = num_shards_for(int(births["n"].to_numpy().sum()) if births.num_rows else 0,
                                  cfg.subjects_per_shard, cfg.min_shards)
        staged = ray.data.read_parquet(files).map_batches(
            tasks.stage_meds_batch, batch_format="pyarrow", fn_kwargs={"n_shards": n_shards})
        (tmp / "events").mkdir()
        shards = _shard_events_dataset(staged, n_shards, tmp / "events", tmp / "quarantine", True, cfg)
    result = _events_result(shards, n_shards, {})
    by_reason: dict[str, int] = {}
    for shard in result.shards:
        for reason, n in shard["dropped"].items():
            by_reason[reason] = by_reason.get(reason, 0) + n
    rows_in = sum(s["rows_in"] for s in result.shards)
    result.tables = {"meds": {"table": "meds", "files": [file_name(f) for f in files], "rows_in": rows_in,
                              "rows_kept": result.events, "rows_quarantined": rows_in - result.events,
                              "by_reason": by_reason, "events": result.events}}
    if sum(by_reason.values()) != rows_in - result.events:
        raise AssertionError("MEDS row account does not add up")
    return result


def _fit_tokenizer(ray, events_dir: Path, events: EventsResult, cfg: PreprocessConfig) -> Tokenizer:
    """Vocabulary from the train code counts the shard writers returned; value-bin edges from the
    train values of the vocabulary's codes, grouped by code (exact order statistics per code)."""
    import ray.data

    settings, ratios, salt = cfg.tokenizer, cfg.splits.ratios, cfg.splits.salt
    code_counts = events.train_code_counts
    candidates = sorted(c for c, n in code_counts.items() if n >= max(settings.min_count, settings.min_values_for_bins))
    edges: dict[str, np.ndarray] = {}
    if candidates:
        files = [{"path": str(p)} for p in sorted(events_dir.glob("part-*.parquet"))]
        events_ds = ray.data.from_items(files, override_num_blocks=len(files)).map_batches(
            tasks.read_parquet_batch, batch_size=1, batch_format="pyarrow",
            fn_kwargs={"columns": ["subject_id", "code", "numeric_value"]})
        values = events_ds.map_batches(
            tasks.train_code_values, batch_format="pyarrow",
            fn_kwargs={"ratios": ratios, "salt": salt, "bin_codes": pa.array(candidates, pa.string())})
        partitions = max(1, min(len(candidates), events.n_shards))
        fitted = _collect(values.groupby("code_index", num_partitions=partitions).map_groups(
            tasks.code_edges_group, batch_format="pyarrow",
            fn_kwargs={"n_bins": settings.value_bins, "min_values": settings.min_values_for_bins}))
        for index, edge in zip(fitted["code_index"].to_pylist() if fitted.num_rows else [],
                               fitted["edges"].to_pylist() if fitted.num_rows else []):
            if edge is not None:
                edges[candidates[index]] = np.asarray(edge, dtype=np.float32)
    train = split_codes(events.subjects, ratios, salt) == 0
    summary = {"train_persons": int(train.sum()), "train_events": int(sum(code_counts.values()))}
    return build_tokenizer(code_counts, edges, min_count=settings.min_count, n_bins=settings.value_bins,
                           min_values_for_bins=settings.min_values_for_bins,
                           gap_edges_days=settings.gap_edges_days, fit_summary=summary)


def _timelines(ray, tmp: Path, tok: Tokenizer, num_pgs: int, shards: list[int], cfg: PreprocessConfig) -> pa.Table:
    import ray.data

    (tmp / "timelines").mkdir()
    items = [{"shard": s} for s in shards]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        tasks.timeline_batch, batch_size=1, batch_format="pyarrow",
        fn_kwargs={"tokenizer": [ray.put(tok)], "events_dir": str(tmp / "events"), "prs_dir": str(tmp / "prs"),
                   "timelines_dir": str(tmp / "timelines"), "num_pgs": num_pgs, "ratios": cfg.splits.ratios,
                   "salt": cfg.splits.salt})
    return _collect(dataset).sort_by("shard")


def check_inputs(inputs: PreprocessInputs) -> None:
    """Fail before any work when a named input is missing (no stage should find out late)."""
    if bool(inputs.omop) == bool(inputs.meds):
        raise ValueError("give exactly one of an OMOP root or a MEDS dataset")
    for flag, path in (("--omop", inputs.omop), ("--meds", inputs.meds), ("--prs", inputs.prs),
                       ("--sample-map", inputs.sample_map), ("--pcs", inputs.pcs)):
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
        files += _meds_files(Path(inputs.meds))
    files += [f for f in (inputs.prs, inputs.sample_map, inputs.pcs) if f]
    return sorted(f for f in files if "://" not in f)


def _token_report(timelines: pa.Table) -> tuple[dict, dict, list[dict]]:
    stats = [json.loads(s) for s in timelines["stats"].to_pylist()] if timelines.num_rows else []
    lengths = np.concatenate([np.asarray(x, dtype=np.int64) for x in timelines["lengths"].to_pylist()]) if stats else np.zeros(0)
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
    shards = [{"file": f"part-{shard:05d}.parquet", "persons": s["subjects"], "tokens": s["tokens"], "sha256": sha}
              for shard, s, sha in zip(timelines["shard"].to_pylist(), stats, timelines["sha256"].to_pylist())]
    return splits, tokens, shards


def run_preprocess(config: PreprocessConfig, inputs: PreprocessInputs, out: str | Path) -> dict:
    """Run every stage into a temp directory, then move it to `out`; returns the report."""
    import ray

    check_inputs(inputs)
    if not ray.is_initialized():
        ray.init()
    # hashing releases the GIL: one driver thread checksums the inputs while the stages run
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
    try:
        files = _input_files(inputs) if config.checksum_inputs else []
        checksums = {f: hasher.submit(tasks.file_sha256, f) for f in files}
        with data_context(config), atomic_directory(Path(out)) as tmp:
            report = _run_stages(ray, config, inputs, tmp, checksums)
    finally:
        hasher.shutdown(wait=False, cancel_futures=True)
    log_to_mlflow(report, {**_flatten(config.model_dump(mode="json")), "tokenizer_version": report["tokenizer"]["version"]})
    return report


def _run_stages(ray, config: PreprocessConfig, inputs: PreprocessInputs, tmp: Path, checksums: dict) -> dict:
    timer = Timer()
    stage = _omop_events if inputs.omop else _meds_events
    events = stage(ray, inputs.omop or inputs.meds, config, tmp, timer)
    subjects, n_shards = events.subjects, events.n_shards
    person_split = split_codes(subjects, config.splits.ratios, config.splits.salt)
    with timer.stage("prs"):
        if inputs.prs:
            prs_inputs = PrsInputs(inputs.prs, inputs.sample_map, inputs.pcs, config.prs.column,
                                   config.prs.sampleset, config.prs.adjust_ancestry)
            person_prs = build_person_prs(prs_inputs, subjects, person_split, tmp / "quarantine" / "prs_samples.parquet")
        else:
            person_prs = PersonPrs.empty(subjects)
        write_prs(tmp / "prs", person_prs, shard_of(subjects, n_shards), n_shards)
    with timer.stage("tokenizer_fit"):
        tok = _fit_tokenizer(ray, tmp / "events", events, config)
        tok.save(tmp / "tokenizer.json")
    with timer.stage("timelines"):
        timelines = _timelines(ray, tmp, tok, len(person_prs.pgs_ids), [s["shard"] for s in events.shards], config)
    splits, tokens, timeline_shards = _token_report(timelines)
    pq.write_table(pa.table({"subject_id": pa.array(subjects, pa.int64()),
                             "split": pa.array(np.asarray(SPLITS, dtype=object)[person_split].tolist(), pa.string())}),
                   tmp / "splits.parquet")
    manifest = {
        "format": TIMELINES_FORMAT,
        "vocab_size": tok.vocab_size,
        "num_pgs": len(person_prs.pgs_ids),
        "pgs_ids": person_prs.pgs_ids,
        "tokenizer_version": tok.version,
        "tokenizer_file": "../tokenizer.json",
        "special_tokens": SPECIAL_TOKENS,
        "first_code_id": FIRST_CODE_ID,
        "counts": {"persons": int(len(subjects)), "persons_by_split": splits, "events": events.events,
                   "tokens": tokens["total"], "persons_with_prs": int(person_prs.has_prs.sum())},
        "token_statistics": tokens,
        "splits": {"ratios": dict(zip(SPLITS, config.splits.ratios)), "salt": config.splits.salt},
        "shards": timeline_shards,
        "input_checksums": {"sha256": {f: future.result() for f, future in checksums.items()}},
    }
    (tmp / "timelines" / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(tmp / "_work", ignore_errors=True)
    (tmp / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    prs_report = {"persons": int(len(subjects)), "persons_with_prs": int(person_prs.has_prs.sum()),
                  "pgs": len(person_prs.pgs_ids), **person_prs.report}
    report = {
        "inputs": {k: v for k, v in asdict(inputs).items() if v},
        "tables": events.tables,
        "totals": {key: sum(a[key] for a in events.tables.values()) for key in ("rows_in", "rows_kept", "rows_quarantined")},
        "events": {"events": events.events, "subjects": int(len(subjects)), "shards": n_shards, "files": events.shards},
        "splits": splits,
        "tokens": tokens,
        "tokenizer": {"version": tok.version, "vocab_size": tok.vocab_size, **tok.fit_summary},
        "prs": prs_report,
        "seconds": timer.total(),
    }
    (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (tmp / "summary.txt").write_text("\n".join(summary_lines(report)) + "\n", encoding="utf-8")
    return report


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
    parser.add_argument("--config", help="PreprocessConfig YAML (jobs/configs/preprocess-default.yaml)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or local)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = load_config(PreprocessConfig, args.config, args.overrides)
    inputs = PreprocessInputs.from_cohort(args.cohort) if args.cohort else PreprocessInputs(omop=args.omop, meds=args.meds)
    for name in ("prs", "sample_map", "pcs"):
        if getattr(args, name):
            setattr(inputs, name, getattr(args, name))
    import ray

    if not ray.is_initialized():
        ray.init(address=args.ray_address)
    try:
        report = run_preprocess(config, inputs, args.out)
    except (OmopSchemaError, PrsFormatError, FileNotFoundError, ValueError) as exc:
        print(f"ehrfm preprocess: {exc}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(report)))
    print(f"outputs: {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
