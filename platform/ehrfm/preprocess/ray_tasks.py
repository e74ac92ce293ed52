"""The functions the preprocess graph runs inside Ray Data tasks (module level, so they pickle by name).

Large read-only state (PersonIndex, duplicate keys, the tokenizer) travels as one object-store
entry; a task receives its reference boxed in a list (so it stays a reference) and resolves it
once per worker process.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from ehrfm.meds.reader import align_data, subject_split_codes
from ehrfm.meds.writer import meds_rows, read_shard, write_shard
from ehrfm.omop.events import (
    BIRTH_CODE,
    CONCEPT_COLUMN,
    PRIORITY_COLUMN,
    SHARD_COLUMN,
    STAGED_SCHEMA,
    finalize_shard,
    place_meds_events,
    stage_meds,
)
from ehrfm.omop.files import OmopSchemaError
from ehrfm.omop.validation import quarantine_rows
from ehrfm.preprocess.ingest import KEY_SCHEMA, IngestContext, Unit, duplicate_keys, ingest_unit, unit_keys
from ehrfm.preprocess.staged_partitions import PartitionedWriter, read_partition
from ehrfm.preprocess.timelines import EVENT_COLUMNS, build_shard, shard_name
from ehrfm.preprocess.tokenizer import code_counts_table, code_values_table, fit_value_edges, train_rows
from ehrfm.splits import shard_of

_RESOLVED: dict[str, object] = {}
INPUT_ERROR_COLUMN = "input_error"  # a task's input error, returned as data (see ingest_to_staged_files)
INPUT_ERRORS_DIR = "_input_errors"  # under IngestContext.accounts_dir: input errors of tasks whose output is rows


def resolve(box: list) -> object:
    """The object behind a boxed ObjectRef, fetched once per worker process (last few kept)."""
    ref = box[0]
    key = ref.hex()
    if key not in _RESOLVED:
        if len(_RESOLVED) >= 4:
            _RESOLVED.pop(next(iter(_RESOLVED)))
        _RESOLVED[key] = ray.get(ref)
    return _RESOLVED[key]


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- ingest ---------------------------------------------------------------------------------------
def _recording_input_error(rows: Iterator[pa.Table], unit: Unit, context: IngestContext) -> Iterator[pa.Table]:
    """`rows`, but an input error (a file that cannot be read as its table) ends them quietly and is
    written to `<accounts_dir>/_input_errors/<unit>.txt` for the driver to raise once the graph is
    done: raised here it would reach the driver wrapped, after pages of Ray logs."""
    try:
        yield from rows
    except OmopSchemaError as exc:
        directory = Path(context.accounts_dir) / INPUT_ERRORS_DIR
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{unit.name}.txt").write_text(str(exc), encoding="utf-8")


def ingest_batch(batch: pa.Table, ctx: list) -> Iterator[pa.Table]:
    context: IngestContext = resolve(ctx)
    for row in batch.to_pylist():
        unit = Unit(**row)
        yield from _recording_input_error(ingest_unit(unit, context), unit, context)
    yield STAGED_SCHEMA.empty_table()  # a unit without events must still give the shuffle a typed block


def write_staged_events(parts: Iterable[pa.Table], staged_dir: str, stem: str) -> int:
    """Staged events (with their shard) -> `<staged_dir>/shard=S/<stem>.parquet`; the rows written."""
    with PartitionedWriter(staged_dir, stem, SHARD_COLUMN, STAGED_SCHEMA) as writer:
        for part in parts:
            writer.add(part)
    return sum(writer.rows.values())


def _staged_counts(stems: list[str], rows: list[int], errors: list[str | None] | None = None) -> pa.Table:
    errors = errors if errors is not None else [None] * len(stems)
    return pa.table(
        {
            "stem": pa.array(stems, pa.string()),
            "rows": pa.array(rows, pa.int64()),
            INPUT_ERROR_COLUMN: pa.array(errors, pa.string()),
        }
    )


def ingest_to_staged_files(batch: pa.Table, ctx: list, staged_dir: str) -> pa.Table:
    """ingest_batch for the "shard_files" strategy: events go to per-shard files, counts come back.

    An input error in a file comes back as data (its one-line message in INPUT_ERROR_COLUMN) for
    the driver to raise: a raised one would reach the driver wrapped, with pages of Ray logs.
    """
    context: IngestContext = resolve(ctx)
    units = [Unit(**row) for row in batch.to_pylist()]
    rows, errors = [], []
    for unit in units:
        try:
            rows.append(write_staged_events(ingest_unit(unit, context), staged_dir, unit.name))
            errors.append(None)
        except OmopSchemaError as exc:
            rows.append(0)
            errors.append(str(exc))
    return _staged_counts([u.name for u in units], rows, errors)


def unit_keys_batch(batch: pa.Table, ctx: list) -> Iterator[pa.Table]:
    context: IngestContext = resolve(ctx)
    for row in batch.to_pylist():
        unit = Unit(**row)
        yield from _recording_input_error(unit_keys(unit, context), unit, context)
    yield KEY_SCHEMA.empty_table()


def duplicate_keys_group(group: pa.Table) -> pa.Table:
    return duplicate_keys(group)


def stage_meds_batch(batch: pa.Table, n_shards: int) -> pa.Table:
    """MEDS rows in the staged layout with their shard (rows without a subject go to shard 0)."""
    staged = stage_meds(align_data(batch))
    subjects = pc.fill_null(staged["subject_id"], 0).to_numpy(zero_copy_only=False)
    shards = np.where(staged["subject_id"].is_valid().to_numpy(zero_copy_only=False), shard_of(subjects, n_shards), 0)
    return staged.append_column(SHARD_COLUMN, pa.array(shards.astype(np.int32)))


def stage_meds_files(batch: pa.Table, n_shards: int, staged_dir: str) -> pa.Table:
    """stage_meds_batch over whole MEDS files, row group by row group, into per-shard files."""
    stems, rows = [], []
    for path, index in zip(batch["path"].to_pylist(), batch["index"].to_pylist()):
        parts = (stage_meds_batch(part, n_shards) for part in parquet_row_groups(path))
        stems.append(f"meds-{index:05d}")
        rows.append(write_staged_events(parts, staged_dir, stems[-1]))
    return _staged_counts(stems, rows)


def count_births_batch(batch: pa.Table) -> pa.Table:
    births = pc.sum(pc.fill_null(pc.equal(batch["code"], BIRTH_CODE), False)).as_py() or 0
    return pa.table({"n": pa.array([births], pa.int64())})


# ---- events shards ------------------------------------------------------------------------------
def write_event_shard(
    group: pa.Table,
    events_dir: str,
    quarantine_dir: str,
    meds_input: bool,
    ratios: tuple[float, float, float],
    salt: int,
    splits_file: str | None = None,
) -> pa.Table:
    """One shard's group from the Ray shuffle -> data/<split>/part-S.parquet; returns its counts."""
    shard = int(group[SHARD_COLUMN][0].as_py())
    return event_shard(shard, group, events_dir, quarantine_dir, meds_input, ratios, salt, splits_file)


def write_staged_event_shards(
    batch: pa.Table,
    staged_dir: str,
    events_dir: str,
    quarantine_dir: str,
    meds_input: bool,
    ratios: tuple[float, float, float],
    salt: int,
    splits_file: str | None = None,
) -> pa.Table:
    """The "shard_files" strategy: each listed shard's staged files -> data/<split>/part-S.parquet."""
    return pa.concat_tables(
        [
            event_shard(
                shard,
                read_partition(staged_dir, SHARD_COLUMN, shard),
                events_dir,
                quarantine_dir,
                meds_input,
                ratios,
                salt,
                splits_file,
            )
            for shard in batch["shard"].to_pylist()
        ]
    )


def event_shard(
    shard: int,
    group: pa.Table,
    events_dir: str,
    quarantine_dir: str,
    meds_input: bool,
    ratios: tuple[float, float, float],
    salt: int,
    splits_file: str | None = None,
) -> pa.Table:
    """All staged events of one shard -> `<events_dir>/data/<split>/part-S.parquet` (the MEDS dataset's
    files of shard S, sorted); returns its counts, including the train-split event count per code
    (the vocabulary's input, so no extra pass) and its distinct codes (for metadata/codes.parquet)."""
    rows_in = group.num_rows
    dropped_by: dict[str, int] = {}
    if meds_input:
        group, dropped = place_meds_events(group)
        if dropped.num_rows:
            for item in pc.value_counts(dropped["reason"]).to_pylist():
                dropped_by[item["values"]] = int(item["counts"])
            target = Path(quarantine_dir) / "meds"
            target.mkdir(parents=True, exist_ok=True)
            rows = quarantine_rows(dropped.drop_columns(["reason"]), dropped["reason"], None)
            pq.write_table(rows, target / shard_name(shard))
    events = finalize_shard(group, keep=(CONCEPT_COLUMN, PRIORITY_COLUMN))
    meds_data = meds_rows(events)
    split_of_row = subject_split_codes(meds_data["subject_id"].to_numpy(), ratios, salt, splits_file)
    paths = write_shard(meds_data, split_of_row, events_dir, shard)
    subjects = np.unique(events["subject_id"].to_numpy())
    counts = train_code_counts(events, ratios, salt, splits_file)
    return pa.table(
        {
            "shard": pa.array([shard], pa.int32()),
            "rows_in": pa.array([rows_in], pa.int64()),
            "events": pa.array([events.num_rows], pa.int64()),
            "subject_ids": pa.array([subjects], pa.list_(pa.int64())),
            "dropped": pa.array([json.dumps(dropped_by, sort_keys=True)], pa.string()),
            "sha256": pa.array([_files_sha256(paths)], pa.string()),
            "codes": pa.array([pc.unique(events["code"]).to_pylist()], pa.list_(pa.string())),
            "train_codes": pa.array([counts["code"]], pa.list_(pa.string())),
            "train_counts": pa.array([counts["n"]], pa.list_(pa.int64())),
        }
    )


def _files_sha256(paths: list[Path]) -> str:
    """One checksum for a shard's split files: sha256 over `<split>/<name>:<file sha256>` lines."""
    lines = [f"{p.parent.name}/{p.name}:{file_sha256(str(p))}" for p in paths]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


# ---- tokenizer fit (train split only) -------------------------------------------------------------
def read_parquet_batch(batch: pa.Table, columns: list[str]) -> Iterator[pa.Table]:
    """The row groups of the listed parquet files (one task per file; cheaper than a listing step)."""
    for path in batch["path"].to_pylist():
        yield from parquet_row_groups(path, columns)


def parquet_row_groups(path: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    parquet = pq.ParquetFile(path)
    for group in range(parquet.num_row_groups):
        yield parquet.read_row_group(group, columns=columns)


def train_code_counts(
    batch: pa.Table, ratios: tuple[float, float, float], salt: int, splits_file: str | None = None
) -> pa.Table:
    train = subject_split_codes(batch["subject_id"].to_numpy(), ratios, salt, splits_file) == 0
    return code_counts_table(train_rows(batch, train))


def train_code_values(
    batch: pa.Table, ratios: tuple[float, float, float], salt: int, bin_codes: pa.Array, splits_file: str | None = None
) -> pa.Table:
    train = subject_split_codes(batch["subject_id"].to_numpy(), ratios, salt, splits_file) == 0
    return code_values_table(train_rows(batch, train), bin_codes)


def code_edges_group(group: pa.Table, n_bins: int, min_values: int) -> pa.Table:
    """Value-bin edges of one code from all its train values (None below `min_values`)."""
    values = group["value"].to_numpy()
    edges = fit_value_edges(values, n_bins, min_values)
    return pa.table(
        {
            "code_index": pa.array([int(group["code_index"][0].as_py())], pa.int32()),
            "n_values": pa.array([len(values)], pa.int64()),
            "edges": pa.array([None if edges is None else edges.tolist()], pa.list_(pa.float32())),
        }
    )


# ---- timelines ----------------------------------------------------------------------------------
def timeline_batch(
    batch: pa.Table,
    tokenizer: list,
    events_dir: str,
    prs_dir: str,
    timelines_dir: str,
    num_pgs: int,
    ratios: tuple[float, float, float],
    salt: int,
    splits_file: str | None = None,
) -> pa.Table:
    tok = resolve(tokenizer)
    rows = {"shard": [], "lengths": [], "stats": [], "sha256": []}
    for shard in batch["shard"].to_pylist():
        table, stats = build_shard(
            read_shard(events_dir, shard, EVENT_COLUMNS),
            Path(prs_dir) / shard_name(shard),
            tok,
            num_pgs,
            ratios,
            salt,
            splits_file,
        )
        path = Path(timelines_dir) / shard_name(shard)
        pq.write_table(table, path)
        rows["shard"].append(shard)
        rows["lengths"].append(stats.pop("lengths"))
        rows["stats"].append(json.dumps(stats, sort_keys=True))
        rows["sha256"].append(file_sha256(str(path)))
    return pa.table(
        {
            "shard": pa.array(rows["shard"], pa.int32()),
            "lengths": pa.array(rows["lengths"], pa.list_(pa.int64())),
            "stats": pa.array(rows["stats"], pa.string()),
            "sha256": pa.array(rows["sha256"], pa.string()),
        }
    )
