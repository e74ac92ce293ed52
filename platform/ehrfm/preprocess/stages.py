"""The steps of `ehrfm preprocess` (see pipeline.py for the order): each builds one Ray Data graph
over files, runs it and returns the small per-shard summaries its tasks produced."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ehrfm.meds.codes import CodeBook, read_vocabulary_table
from ehrfm.meds.layout import CODES_FILE, data_files
from ehrfm.meds.reader import split_account, subject_split_codes
from ehrfm.omop.events import SHARD_COLUMN, death_events, person_events
from ehrfm.omop.files import OmopSchemaError, file_name
from ehrfm.omop.spec import TABLE_ORDER
from ehrfm.omop.validation import PersonIndex, find_tables, validate_table
from ehrfm.preprocess import ray_tasks as tasks
from ehrfm.preprocess.config import SHARD_FILES, PreprocessConfig
from ehrfm.preprocess.ingest import (
    IngestContext,
    duplicates_by_unit,
    plan_units,
    table_accounts,
    tables_needing_key_check,
)
from ehrfm.preprocess.staged_partitions import partition_values
from ehrfm.preprocess.tokenizer import Tokenizer, build_tokenizer
from ehrfm.splits import num_shards_for, shard_of

DRIVER_TABLES = ("person", "death")


def collect(dataset) -> pa.Table:
    """All (small) output rows of a dataset as one table."""
    parts = list(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
    parts = [p for p in parts if p.num_rows]
    return pa.concat_tables(parts) if parts else pa.table({})


def _write_quarantine(directory: Path, table: str, quarantine: pa.Table) -> None:
    if quarantine.num_rows:
        (directory / table).mkdir(parents=True, exist_ok=True)
        pq.write_table(quarantine, directory / table / "00000-all.parquet")


def meds_files(root: Path) -> list[str]:
    data = root / "data" if (root / "data").is_dir() else root
    files = sorted(str(p) for p in data.rglob("*.parquet") if "metadata" not in p.relative_to(root).parts)
    if not files:
        raise FileNotFoundError(f"MEDS input {root}: no parquet data files")
    return files


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
    plausibility: dict = field(default_factory=dict)  # the date rules applied (OMOP input only)
    codes: list[str] = field(default_factory=list)  # every distinct code written (metadata/codes.parquet)
    codebook: CodeBook = field(default_factory=CodeBook.empty)
    ancestors: object = None  # OMOP concept_ancestor (polars), for parent codes; None when absent


def _shard_events_dataset(
    dataset, n_shards: int, events_dir: Path, quarantine_dir: Path, meds_input: bool, cfg: PreprocessConfig
) -> pa.Table:
    """groupby(shard) -> one sorted events file per shard; returns the per-shard counts."""
    written = dataset.groupby(SHARD_COLUMN, num_partitions=max(1, n_shards)).map_groups(
        tasks.write_event_shard,
        batch_format="pyarrow",
        fn_kwargs=_shard_writer_kwargs(events_dir, quarantine_dir, meds_input, cfg),
    )
    return collect(written)


def _shard_writer_kwargs(events_dir: Path, quarantine_dir: Path, meds_input: bool, cfg: PreprocessConfig) -> dict:
    return {
        "events_dir": str(events_dir),
        "quarantine_dir": str(quarantine_dir),
        "meds_input": meds_input,
        "ratios": cfg.splits.ratios,
        "salt": cfg.splits.salt,
        "splits_file": cfg.splits.subject_splits,
    }


def _total_rows(counts: pa.Table, column: str = "rows") -> int:
    return int(pc.sum(counts[column]).as_py() or 0) if counts.num_rows else 0


def _shard_staged_files(
    staged_dir: Path, staged_rows: int, events_dir: Path, quarantine_dir: Path, meds_input: bool, cfg: PreprocessConfig
) -> pa.Table:
    """The "shard_files" strategy's second step: one task per shard reads that shard's staged files
    and writes its events file (the same code as the groupby's); the staged files are then removed."""
    import ray.data

    shards = [{"shard": s} for s in partition_values(staged_dir, SHARD_COLUMN)]
    written = pa.table({})
    if shards:
        written = collect(
            ray.data.from_items(shards, override_num_blocks=len(shards)).map_batches(
                tasks.write_staged_event_shards,
                batch_size=1,
                batch_format="pyarrow",
                fn_kwargs={
                    "staged_dir": str(staged_dir),
                    **_shard_writer_kwargs(events_dir, quarantine_dir, meds_input, cfg),
                },
            )
        )
    read_rows = _total_rows(written, "rows_in")
    if staged_rows != read_rows:
        raise AssertionError(f"staged events: {staged_rows} rows written, {read_rows} read back")
    shutil.rmtree(staged_dir, ignore_errors=True)
    return written


def _raise_task_input_error(counts: pa.Table | None = None, accounts_dir: Path | None = None) -> None:
    """Raise, in the driver, the first input error ingest tasks returned as data (a column of their
    counts, or files under accounts_dir; see ray_tasks.INPUT_ERROR_COLUMN / INPUT_ERRORS_DIR)."""
    errors = []
    if counts is not None and tasks.INPUT_ERROR_COLUMN in counts.column_names:
        errors = [e for e in counts[tasks.INPUT_ERROR_COLUMN].to_pylist() if e]
    if not errors and accounts_dir is not None and (accounts_dir / tasks.INPUT_ERRORS_DIR).is_dir():
        errors = [p.read_text(encoding="utf-8") for p in sorted((accounts_dir / tasks.INPUT_ERRORS_DIR).iterdir())]
    if errors:
        raise OmopSchemaError(errors[0])


def _unit_items(units: list) -> object:
    """A dataset of the ingest units, one block (so one task) each."""
    import ray.data

    return ray.data.from_items([asdict(u) for u in units], override_num_blocks=len(units))


def _omop_shard_files(
    driver_events: pa.Table, units: list, ctx_ref: list, tmp: Path, quarantine_dir: Path, cfg: PreprocessConfig
) -> pa.Table:
    """The "shard_files" strategy for OMOP: the driver's person/death events and every ingest task
    write their events to per-shard files (only row counts come back), then one task per shard."""
    staged_dir = tmp / "_work" / "staged"
    staged_rows = tasks.write_staged_events([driver_events], str(staged_dir), "person-death")
    if units:
        counts = collect(
            _unit_items(units).map_batches(
                tasks.ingest_to_staged_files,
                batch_size=1,
                batch_format="pyarrow",
                fn_kwargs={"ctx": ctx_ref, "staged_dir": str(staged_dir)},
            )
        )
        _raise_task_input_error(counts)
        staged_rows += _total_rows(counts)
    return _shard_staged_files(staged_dir, staged_rows, tmp, quarantine_dir, False, cfg)


def omop_events(root: str, cfg: PreprocessConfig, tmp: Path, timer: Timer) -> EventsResult:
    """Validate and map every OMOP table; the MEDS data/<split>/ files written, accounts and per-shard counts returned."""
    import ray
    import ray.data

    tables = find_tables(root)
    if "person" not in tables:
        raise OmopSchemaError(f"OMOP root {root} has no person table")
    quarantine_dir, accounts_dir = tmp / "quarantine", tmp / "_work" / "accounts"
    rules = cfg.plausibility.rules(root)  # extraction date (cdm_source, config or run date) and slack
    with timer.stage("persons"):
        person = validate_table(tables["person"], "person", None, cfg.batch_rows, rules.integer_date_rules)
        persons = PersonIndex.from_tables(person.kept, rules=rules)
        death = validate_table(tables["death"], "death", persons, cfg.batch_rows) if "death" in tables else None
        persons = PersonIndex.from_tables(person.kept, death.kept if death else None, rules=rules)
        if "observation_period" in tables:  # each person's last period end, for after_observation_period
            periods = validate_table(tables["observation_period"], "observation_period", persons, cfg.batch_rows)
            persons = persons.with_observation(periods.kept)
        n_shards = num_shards_for(len(persons), cfg.subjects_per_shard, cfg.min_shards)
        book = CodeBook.from_omop_dir(root) if "://" not in str(root) else CodeBook.empty()
        driver_events, driver_counts = person_events(person.kept, book)
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
    context = IngestContext(persons, n_shards, cfg.batch_rows, str(quarantine_dir), str(accounts_dir), codebook=book)
    flagged = tables_needing_key_check(units)
    if flagged:
        with timer.stage("cross_file_keys"):
            key_units = [asdict(u) for u in units if u.table in flagged]
            context.key_buckets = min(context.key_buckets, len(key_units))
            ref = [ray.put(context)]
            keys = ray.data.from_items(key_units, override_num_blocks=len(key_units)).map_batches(
                tasks.unit_keys_batch, batch_size=1, batch_format="pyarrow", fn_kwargs={"ctx": ref}
            )
            dupes = collect(
                keys.groupby("bucket", num_partitions=context.key_buckets).map_groups(
                    tasks.duplicate_keys_group, batch_format="pyarrow"
                )
            )
            _raise_task_input_error(accounts_dir=accounts_dir)
            context.cross_unit_duplicates = duplicates_by_unit(dupes) if dupes.num_rows else {}
    with timer.stage("ingest_events"):
        ref = [ray.put(context)]
        if cfg.shuffle_strategy == SHARD_FILES:
            shards = _omop_shard_files(driver_events, units, ref, tmp, quarantine_dir, cfg)
        else:
            parts = [ray.data.from_arrow(driver_events)]
            if units:
                parts.insert(
                    0,
                    _unit_items(units).map_batches(
                        tasks.ingest_batch, batch_size=1, batch_format="pyarrow", fn_kwargs={"ctx": ref}
                    ),
                )
            dataset = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
            shards = _shard_events_dataset(dataset, n_shards, tmp, quarantine_dir, False, cfg)
            _raise_task_input_error(accounts_dir=accounts_dir)
    accounts.update(table_accounts(accounts_dir, units))
    ordered = {t: accounts[t] for t in TABLE_ORDER if t in accounts}
    if flagged:
        for table in flagged:
            ordered[table]["cross_file_key_check"] = True
    return replace(
        _events_result(shards, n_shards, ordered),
        plausibility=rules.report(),
        codebook=book,
        ancestors=_concept_ancestor(root) if len(book) else None,
    )


def _concept_ancestor(root: str):
    """The OMOP concept_ancestor edges (with min_levels_of_separation when present); None when absent."""
    columns = ("ancestor_concept_id", "descendant_concept_id")
    if "://" in str(root):
        return None
    try:
        return read_vocabulary_table(root, "concept_ancestor", (*columns, "min_levels_of_separation"))
    except ValueError:  # no level column: every ancestor counts as a parent
        return read_vocabulary_table(root, "concept_ancestor", columns)


def _events_result(shards: pa.Table, n_shards: int, tables: dict[str, dict]) -> EventsResult:
    if not shards.num_rows:
        return EventsResult(np.zeros(0, np.int64), n_shards, tables, [], 0, {})
    shards = shards.sort_by("shard")
    subjects = np.sort(shards["subject_ids"].combine_chunks().flatten().to_numpy())
    if np.any(subjects[1:] == subjects[:-1]):
        raise AssertionError("a subject appears in two event shards")
    persons = pc.list_value_length(shards["subject_ids"]).to_pylist()
    scalars = shards.select(["shard", "events", "rows_in", "dropped", "sha256"]).to_pylist()
    summaries = [
        {
            "file": f"part-{r['shard']:05d}.parquet",
            "shard": r["shard"],
            "events": r["events"],
            "persons": n,
            "rows_in": r["rows_in"],
            "dropped": json.loads(r["dropped"]),
            "sha256": r["sha256"],
        }
        for r, n in zip(scalars, persons)
    ]
    counts = (
        pa.table(
            {
                "code": shards["train_codes"].combine_chunks().flatten(),
                "n": shards["train_counts"].combine_chunks().flatten(),
            }
        )
        .group_by("code")
        .aggregate([("n", "sum")])
    )
    code_counts = dict(zip(counts["code"].to_pylist(), counts["n_sum"].to_pylist()))
    codes = sorted(set(shards["codes"].combine_chunks().flatten().to_pylist()))
    events = int(sum(r["events"] for r in scalars))
    return EventsResult(subjects, n_shards, tables, summaries, events, code_counts, codes=codes)


def meds_events(root: str, cfg: PreprocessConfig, tmp: Path, timer: Timer) -> EventsResult:
    """A MEDS dataset re-sharded, sorted and checked into data/<split>/ (rows that cannot be placed counted)."""
    import ray.data

    files = meds_files(Path(root))
    with timer.stage("ingest_events"):
        births = collect(
            ray.data.read_parquet(files, columns=["code"]).map_batches(tasks.count_births_batch, batch_format="pyarrow")
        )
        n_shards = num_shards_for(
            int(births["n"].to_numpy().sum()) if births.num_rows else 0, cfg.subjects_per_shard, cfg.min_shards
        )
        if cfg.shuffle_strategy == SHARD_FILES:
            staged_dir = tmp / "_work" / "staged"
            items = [{"path": f, "index": i} for i, f in enumerate(files)]
            staged = collect(
                ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                    tasks.stage_meds_files,
                    batch_size=1,
                    batch_format="pyarrow",
                    fn_kwargs={"n_shards": n_shards, "staged_dir": str(staged_dir)},
                )
            )
            shards = _shard_staged_files(staged_dir, _total_rows(staged), tmp, tmp / "quarantine", True, cfg)
        else:
            dataset = ray.data.read_parquet(files).map_batches(
                tasks.stage_meds_batch, batch_format="pyarrow", fn_kwargs={"n_shards": n_shards}
            )
            shards = _shard_events_dataset(dataset, n_shards, tmp, tmp / "quarantine", True, cfg)
    result = _events_result(shards, n_shards, {})
    if (Path(root) / CODES_FILE).is_file():  # the input's own concept ids, where it has them
        result.codebook = CodeBook.from_codes_metadata(Path(root) / CODES_FILE)
    by_reason: dict[str, int] = {}
    for shard in result.shards:
        for reason, n in shard["dropped"].items():
            by_reason[reason] = by_reason.get(reason, 0) + n
    rows_in = sum(s["rows_in"] for s in result.shards)
    result.tables = {
        "meds": {
            "table": "meds",
            "files": [file_name(f) for f in files],
            "rows_in": rows_in,
            "rows_kept": result.events,
            "rows_quarantined": rows_in - result.events,
            "by_reason": by_reason,
            "events": result.events,
            "splits": split_account(result.subjects, cfg.splits.ratios, cfg.splits.salt, cfg.splits.subject_splits),
        }
    }
    if sum(by_reason.values()) != rows_in - result.events:
        raise AssertionError("MEDS row account does not add up")
    return result


def fit_tokenizer(dataset_root: Path, events: EventsResult, cfg: PreprocessConfig) -> Tokenizer:
    """Vocabulary from the train code counts the shard writers returned; value-bin edges from the
    train values of the vocabulary's codes, grouped by code (exact order statistics per code)."""
    import ray.data

    settings, ratios, salt = cfg.tokenizer, cfg.splits.ratios, cfg.splits.salt
    code_counts = events.train_code_counts
    candidates = sorted(c for c, n in code_counts.items() if n >= max(settings.min_count, settings.min_values_for_bins))
    edges: dict[str, np.ndarray] = {}
    if candidates:
        files = [{"path": str(p)} for p in data_files(dataset_root)]
        events_ds = ray.data.from_items(files, override_num_blocks=len(files)).map_batches(
            tasks.read_parquet_batch,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={"columns": ["subject_id", "code", "numeric_value"]},
        )
        values = events_ds.map_batches(
            tasks.train_code_values,
            batch_format="pyarrow",
            fn_kwargs={
                "ratios": ratios,
                "salt": salt,
                "bin_codes": pa.array(candidates, pa.string()),
                "splits_file": cfg.splits.subject_splits,
            },
        )
        partitions = max(1, min(len(candidates), events.n_shards))
        fitted = collect(
            values.groupby("code_index", num_partitions=partitions).map_groups(
                tasks.code_edges_group,
                batch_format="pyarrow",
                fn_kwargs={"n_bins": settings.value_bins, "min_values": settings.min_values_for_bins},
            )
        )
        for index, edge in zip(
            fitted["code_index"].to_pylist() if fitted.num_rows else [],
            fitted["edges"].to_pylist() if fitted.num_rows else [],
        ):
            if edge is not None:
                edges[candidates[index]] = np.asarray(edge, dtype=np.float32)
    train = subject_split_codes(events.subjects, ratios, salt, cfg.splits.subject_splits) == 0
    summary = {"train_persons": int(train.sum()), "train_events": int(sum(code_counts.values()))}
    return build_tokenizer(
        code_counts,
        edges,
        min_count=settings.min_count,
        n_bins=settings.value_bins,
        min_values_for_bins=settings.min_values_for_bins,
        gap_edges_days=settings.gap_edges_days,
        fit_summary=summary,
    )


def build_timelines(tmp: Path, tok: Tokenizer, num_pgs: int, shards: list[int], cfg: PreprocessConfig) -> pa.Table:
    """One task per events shard -> timelines/part-S.parquet; returns per-shard lengths and counts."""
    import ray
    import ray.data

    (tmp / "timelines").mkdir()
    items = [{"shard": s} for s in shards]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        tasks.timeline_batch,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={
            "tokenizer": [ray.put(tok)],
            "events_dir": str(tmp),
            "prs_dir": str(tmp / "prs"),
            "timelines_dir": str(tmp / "timelines"),
            "num_pgs": num_pgs,
            "ratios": cfg.splits.ratios,
            "salt": cfg.splits.salt,
            "splits_file": cfg.splits.subject_splits,
        },
    )
    return collect(dataset).sort_by("shard")
