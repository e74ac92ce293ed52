"""Ingest work units: one OMOP file each, validated batch by batch inside a Ray Data task.

A unit reads its file with the OMOP readers, runs `omop.validate_batch` on each batch against the
PersonIndex, removes primary-key duplicates, maps the kept rows to events and yields them (tagged
with their subject's shard) to the shuffle. Its quarantine rows and its row account are written
as side files named after the unit, so a retried task rewrites the same files.

Primary-key duplicates, exactly as `omop.validate_table` defines them (the first kept occurrence
in file order wins):
- within a unit, a running set of the keys seen so far catches them as the batches stream by;
- across units, a global step is needed only when two units of a table can share a key. Parquet
  footers give each file's key range; when the ranges of a table's files are disjoint no
  cross-file duplicate is possible and the step is skipped. Otherwise the kept keys of that
  table's units are hash-partitioned by key (a Ray Data groupby on a key bucket), every key held
  by more than one unit is resolved in favour of the earliest unit, and the later occurrences are
  handed to the units, which quarantine them while they map their rows to events.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ehrfm.omop.events import EVENT_SOURCES, SHARD_COLUMN, Coder, EventCounts, table_events
from ehrfm.omop.files import MALFORMED_LINE_COLUMN, file_name, iter_raw_batches
from ehrfm.omop.spec import CDM_TABLES, REASONS, TABLE_ORDER
from ehrfm.omop.validation import PersonIndex, quarantine_rows, validate_batch
from ehrfm.splits import shard_of, subject_hash

DUPLICATE = "duplicate_primary_key"
TABLE_CODES = {table: code for code, table in enumerate(TABLE_ORDER)}
KEY_SCHEMA = pa.schema([("table_code", pa.int16()), ("unit", pa.int32()), ("key", pa.int64()), ("bucket", pa.int32())])
_PACK_LIMIT = 2**31  # composite keys are packed as (a << 32) | b; CDM integers are 32-bit


@dataclass(frozen=True)
class Unit:
    """One file of one table; `index` is its place in the table's file order (earlier wins duplicates)."""

    table: str
    path: str
    index: int

    @property
    def name(self) -> str:
        return f"{self.table}-{self.index:05d}"


def plan_units(tables: dict[str, list[str]], skip: tuple[str, ...] = ()) -> list[Unit]:
    """Units of every supported table in `tables` (from omop.find_tables), in TABLE_ORDER."""
    return [Unit(t, path, i) for t in TABLE_ORDER if t in tables and t not in skip for i, path in enumerate(tables[t])]


# ---- primary keys -------------------------------------------------------------------------------
def primary_key(table: str, kept: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(int64 key per row, rows whose key is complete); rows with a null key part are never duplicates."""
    columns = CDM_TABLES[table].primary_key
    parts, valid = [], np.ones(kept.num_rows, dtype=bool)
    for name in columns:
        values = kept[name].combine_chunks()
        valid &= values.is_valid().to_numpy(zero_copy_only=False)
        parts.append(pc.fill_null(values, 0).to_numpy(zero_copy_only=False).astype(np.int64))
    if len(parts) == 1:
        return parts[0], valid
    first, second = parts
    outside = valid & ((first < 0) | (first >= _PACK_LIMIT) | (second < 0) | (second >= _PACK_LIMIT))
    if outside.any():
        raise ValueError(
            f"{table}: {int(outside.sum())} rows have key values ({', '.join(columns)}) outside the "
            f"CDM integer range [0, 2^31); they cannot be checked for duplicates"
        )
    return (first << 32) | second, valid


class SeenKeys:
    """Keys seen so far in a unit, as a few sorted runs merged like a log-structured store."""

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def first_new(self, keys: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """True for rows whose key is new (first in this batch and never seen); records the new keys."""
        keep = np.ones(len(keys), dtype=bool)
        rows = np.flatnonzero(valid)
        if len(rows) == 0:
            return keep
        values = keys[rows]
        unique, first = np.unique(values, return_index=True)
        fresh = np.zeros(len(rows), dtype=bool)
        fresh[first] = True
        for run in self.runs:
            pos = np.minimum(np.searchsorted(run, values), len(run) - 1)
            fresh &= run[pos] != values
        keep[rows] = fresh
        self._add(values[fresh])
        return keep

    def _add(self, new: np.ndarray) -> None:
        if len(new) == 0:
            return
        self.runs.append(np.sort(new))
        while len(self.runs) > 1 and len(self.runs[-1]) >= len(self.runs[-2]):
            top = self.runs.pop()
            self.runs[-1] = np.sort(np.concatenate([self.runs[-1], top]), kind="stable")


def _range_of_parquet_keys(path: str, table: str) -> tuple[int, int] | None | str:
    """(min, max) of the key column from the parquet footer; "empty" for no rows; None when unknown."""
    columns = CDM_TABLES[table].primary_key
    if len(columns) != 1 or "://" in path:
        return None
    try:
        meta = pq.ParquetFile(path).metadata
    except (OSError, pa.ArrowInvalid):
        return None  # the unit will raise a clear error when it reads the file
    if meta.num_rows == 0:
        return "empty"
    names = [meta.schema.column(i).name.lower() for i in range(meta.num_columns)]
    if columns[0] not in names:
        return None
    col = names.index(columns[0])
    low, high = None, None
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(col).statistics
        if stats is None or not stats.has_min_max or stats.physical_type not in ("INT32", "INT64"):
            return None
        low = stats.min if low is None else min(low, stats.min)
        high = stats.max if high is None else max(high, stats.max)
    return int(low), int(high)


def tables_needing_key_check(units: list[Unit]) -> list[str]:
    """Tables whose units may share a primary key (more than one file and no proof of disjoint ranges)."""
    by_table: dict[str, list[Unit]] = {}
    for unit in units:
        by_table.setdefault(unit.table, []).append(unit)
    flagged = []
    for table, members in by_table.items():
        if len(members) < 2 or not CDM_TABLES[table].primary_key:
            continue
        ranges = [
            _range_of_parquet_keys(u.path, table) if u.path.lower().endswith((".parquet", ".pq")) else None
            for u in members
        ]
        if any(r is None for r in ranges):
            flagged.append(table)
            continue
        spans = sorted(r for r in ranges if r != "empty")
        if any(b[0] <= a[1] for a, b in zip(spans, spans[1:])):
            flagged.append(table)
    return flagged


def duplicate_keys(group: pa.Table) -> pa.Table:
    """For one key bucket: the (table, unit, key) of every occurrence after the earliest unit's."""
    table = group["table_code"].to_numpy().astype(np.int64)
    unit = group["unit"].to_numpy().astype(np.int64)
    key = group["key"].to_numpy()
    order = np.lexsort((unit, key, table))
    table, unit, key = table[order], unit[order], key[order]
    later = np.r_[False, (table[1:] == table[:-1]) & (key[1:] == key[:-1])] if len(key) else np.zeros(0, bool)
    return pa.table(
        {
            "table_code": pa.array(table[later], pa.int16()),
            "unit": pa.array(unit[later], pa.int32()),
            "key": pa.array(key[later], pa.int64()),
        }
    )


def duplicates_by_unit(rows: pa.Table) -> dict[tuple[str, int], np.ndarray]:
    """{(table, unit index): sorted keys that unit must quarantine} from duplicate_keys output."""
    tables = list(TABLE_ORDER)
    out: dict[tuple[str, int], list[int]] = {}
    for code, unit, key in zip(*(rows[c].to_pylist() for c in ("table_code", "unit", "key"))):
        out.setdefault((tables[code], unit), []).append(key)
    return {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in out.items()}


# ---- one unit -----------------------------------------------------------------------------------
@dataclass
class IngestContext:
    """Everything a unit needs, shipped once to the object store."""

    persons: PersonIndex
    n_shards: int
    batch_rows: int
    quarantine_dir: str
    accounts_dir: str
    cross_unit_duplicates: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    key_buckets: int = 16
    codebook: Coder | None = None  # the cohort's concept codes (ehrfm.meds.codes.CodeBook); None: id form


@dataclass
class UnitAccount:
    table: str
    unit: int
    file: str
    rows_in: int = 0
    rows_kept: int = 0
    rows_quarantined: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    extra_columns: list[str] = field(default_factory=list)
    renamed_cdm53_columns: list[str] = field(default_factory=list)
    mapping: dict[str, int] = field(default_factory=dict)

    def count(self, reasons: list[str]) -> None:
        for reason in reasons:
            self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        self.rows_quarantined += len(reasons)


class _QuarantineWriter:
    """Parquet files of one unit's quarantined rows, one per row layout (raw, malformed, duplicate)."""

    def __init__(self, directory: Path, unit: Unit) -> None:
        self.directory, self.unit = directory, unit
        self.writers: dict[str, pq.ParquetWriter] = {}

    def write(self, kind: str, rows: pa.Table) -> None:
        if rows.num_rows == 0:
            return
        if kind not in self.writers:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"{self.unit.index:05d}-{kind}.parquet"
            self.writers[kind] = pq.ParquetWriter(path, rows.schema)
        self.writers[kind].write_table(rows)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def _validated(
    unit: Unit, ctx: IngestContext, account: UnitAccount, quarantine: _QuarantineWriter | None
) -> Iterator[pa.Table]:
    """Kept rows of a unit, batch by batch, with duplicates (in-unit and cross-unit) removed."""
    persons = None if unit.table == "person" else ctx.persons
    seen = SeenKeys()
    has_key = bool(CDM_TABLES[unit.table].primary_key)
    drop = ctx.cross_unit_duplicates.get((unit.table, unit.index))
    extra, renamed = set(), set()
    spec_columns = set(CDM_TABLES[unit.table].column_names)
    for batch in iter_raw_batches([unit.path], unit.table, ctx.batch_rows):
        account.rows_in += batch.table.num_rows + len(batch.malformed_lines)
        extra.update(c for c in batch.table.column_names if c not in spec_columns)
        renamed.update(batch.renamed)
        if batch.malformed_lines:
            lines = pa.table(
                {MALFORMED_LINE_COLUMN: pa.array([x.rstrip("\r\n") for x in batch.malformed_lines], pa.string())}
            )
            account.count(["malformed_row"] * lines.num_rows)
            if quarantine:
                quarantine.write(
                    "malformed", quarantine_rows(lines, ["malformed_row"] * lines.num_rows, batch.source_file)
                )
        kept, rejected = validate_batch(unit.table, batch.table, persons, batch.source_file)
        account.count(rejected["reason"].to_pylist())
        if quarantine:
            quarantine.write("rows", rejected)
        if has_key and kept.num_rows:
            keys, valid = primary_key(unit.table, kept)
            keep = seen.first_new(keys, valid)
            if drop is not None:
                pos = np.minimum(np.searchsorted(drop, keys), len(drop) - 1)
                keep &= ~(valid & (drop[pos] == keys))
            if not keep.all():
                dupes = kept.filter(pa.array(~keep))
                account.count([DUPLICATE] * dupes.num_rows)
                if quarantine:
                    quarantine.write(
                        "duplicates", quarantine_rows(dupes, [DUPLICATE] * dupes.num_rows, batch.source_file)
                    )
                kept = kept.filter(pa.array(keep))
        account.rows_kept += kept.num_rows
        yield kept
    account.extra_columns, account.renamed_cdm53_columns = sorted(extra), sorted(renamed)


def ingest_unit(unit: Unit, ctx: IngestContext) -> Iterator[pa.Table]:
    """Validate one unit and yield its events with their shard; writes its quarantine and account."""
    account = UnitAccount(unit.table, unit.index, file_name(unit.path))
    quarantine = _QuarantineWriter(Path(ctx.quarantine_dir) / unit.table, unit)
    counts = EventCounts()
    try:
        for kept in _validated(unit, ctx, account, quarantine):
            if unit.table in EVENT_SOURCES and kept.num_rows:
                events, batch_counts = table_events(unit.table, kept, ctx.codebook)
                counts.add(batch_counts)
                subjects = events["subject_id"].to_numpy()
                yield events.append_column(SHARD_COLUMN, pa.array(shard_of(subjects, ctx.n_shards)))
    finally:
        quarantine.close()
    account.mapping = counts.as_dict()
    if account.rows_in != account.rows_kept + account.rows_quarantined:  # guards the invariant
        raise AssertionError(f"{unit.table}: row account of {account.file} does not add up")
    directory = Path(ctx.accounts_dir) / unit.table
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{unit.index:05d}.json").write_text(json.dumps(asdict(account)), encoding="utf-8")


def unit_keys(unit: Unit, ctx: IngestContext) -> Iterator[pa.Table]:
    """The unit's kept, in-unit-unique primary keys with their hash bucket (for the global check)."""
    account = UnitAccount(unit.table, unit.index, file_name(unit.path))
    code = TABLE_CODES[unit.table]
    for kept in _validated(unit, ctx, account, None):
        keys, valid = primary_key(unit.table, kept)
        keys = keys[valid]
        bucket = (subject_hash(keys, code) % np.uint64(ctx.key_buckets)).astype(np.int32)
        yield pa.table(
            {
                "table_code": pa.array(np.full(len(keys), code), pa.int16()),
                "unit": pa.array(np.full(len(keys), unit.index), pa.int32()),
                "key": pa.array(keys, pa.int64()),
                "bucket": pa.array(bucket),
            },
            schema=KEY_SCHEMA,
        )


# ---- accounts -----------------------------------------------------------------------------------
def table_accounts(accounts_dir: Path, units: list[Unit]) -> dict[str, dict]:
    """Per-table row accounts summed over the units' account files, in the validate_omop layout."""
    out: dict[str, dict] = {}
    for unit in units:
        data = json.loads((accounts_dir / unit.table / f"{unit.index:05d}.json").read_text(encoding="utf-8"))
        acc = out.setdefault(
            unit.table,
            {
                "table": unit.table,
                "files": [],
                "rows_in": 0,
                "rows_kept": 0,
                "rows_quarantined": 0,
                "by_reason": {},
                "extra_columns": set(),
                "renamed_cdm53_columns": set(),
                "events": 0,
                "mapping": {},
            },
        )
        acc["files"].append(data["file"])
        for key in ("rows_in", "rows_kept", "rows_quarantined"):
            acc[key] += data[key]
        for reason, n in data["by_reason"].items():
            acc["by_reason"][reason] = acc["by_reason"].get(reason, 0) + n
        for name, n in data["mapping"].items():
            acc["mapping"][name] = acc["mapping"].get(name, 0) + n
        acc["extra_columns"].update(data["extra_columns"])
        acc["renamed_cdm53_columns"].update(data["renamed_cdm53_columns"])
    for acc in out.values():
        acc["by_reason"] = {r: acc["by_reason"][r] for r in REASONS if r in acc["by_reason"]}
        acc["extra_columns"] = sorted(acc["extra_columns"])
        acc["renamed_cdm53_columns"] = sorted(acc["renamed_cdm53_columns"])
        acc["events"] = acc["mapping"].get("events", 0)
        if acc["rows_in"] != acc["rows_kept"] + acc["rows_quarantined"]:
            raise AssertionError(f"{acc['table']}: row account does not add up")
    return out
