"""Driver-side pre-flight: is every OMOP file readable, and does its header hold what ehrfm needs?

Run by `ehrfm validate` and `ehrfm preprocess` before any row is read (and before the Ray graph
starts), so that a broken file ends the command in a second with one line naming file, table and
column, instead of failing inside a Ray task minutes later. It stays cheap on large inputs: csv
files are read for their first 64 KiB (header and encoding), parquet files for their footer
(schema, row count, column-chunk extents); only gzip files are decompressed in full (a truncated
stream shows only at its end), streamed, in parallel, and skipped above `gzip_check_bytes`.
Problems are OmopSchemaError; vocabulary tables missing unused columns give warnings.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs

from ehrfm.omop.cast import ColumnTypeError, convert_column
from ehrfm.omop.files import (
    OmopSchemaError,
    check_required,
    csv_header,
    file_name,
    find_tables,
    missing_expected,
    normal_names,
    open_parquet,
    problem,
    split_uri,
)
from ehrfm.omop.spec import CDM_TABLES

GZIP_CHECK_BYTES = 1 << 30  # compressed size above which a .gz file gets only its header checked
_CHUNK = 1 << 16  # gzip check read size: the break is reported to this granularity


@dataclass
class Preflight:
    """What the pre-flight found: the tables (as find_tables), warnings, and what it cost."""

    tables: dict[str, list[str]]
    warnings: list[str] = field(default_factory=list)
    files: int = 0
    gzip_bytes_checked: int = 0
    seconds: float = 0.0


def _gzip_stream_ok(fs: pafs.FileSystem, path: str, source: str, table: str) -> None:
    """Decompress a whole .gz file, streamed: a truncated or corrupt stream fails only at its end."""
    total = 0
    try:
        with fs.open_input_stream(path, compression="gzip") as stream:
            while chunk := stream.read(_CHUNK):
                total += len(chunk)
    except (OSError, EOFError, pa.ArrowInvalid):
        raise problem(
            source, table, f"gzip stream is corrupt or truncated (it breaks after {total:,} decompressed bytes)"
        ) from None


def _stored_types_fit(schema: pa.Schema, table: str, source: str, rows: int) -> None:
    """Refuse a parquet column whose stored type can never hold its CDM type (bool for a date, ...):
    the converters are asked with an empty column of that type, so the rule lives in one place."""
    spec = CDM_TABLES[table]
    names, _ = normal_names(schema.names, table, source)
    for name, stored in zip(names, schema.types):
        if name not in spec.column_names:
            continue
        column = spec.column(name)
        try:
            convert_column(pa.array([], type=stored), column)
        except ColumnTypeError:
            raise problem(
                source, table, f"stored as {stored}, which cannot hold CDM {column.kind} ({rows:,} rows)", column=name
            ) from None
        except Exception:  # noqa: BLE001 - anything else is for the row-level read to judge
            continue


def _parquet_columns(fs: pafs.FileSystem, path: str, size: int, source: str, table: str) -> tuple[list[str], int]:
    """(column names, rows) from the footer; refuses a file whose column chunks end past its size
    or whose stored types cannot hold the CDM types."""
    with fs.open_input_file(path) as handle:
        parquet = open_parquet(handle, source, table)
        try:
            meta = parquet.metadata
            for group in range(meta.num_row_groups):
                row_group = meta.row_group(group)
                for index in range(row_group.num_columns):
                    chunk = row_group.column(index)
                    start = min(o for o in (chunk.dictionary_page_offset, chunk.data_page_offset) if o is not None)
                    if start + chunk.total_compressed_size > size:
                        raise problem(
                            source,
                            table,
                            f"truncated parquet: row group {group} ends past the file's {size:,} bytes",
                            column=chunk.path_in_schema,
                        )
            _stored_types_fit(parquet.schema_arrow, table, source, meta.num_rows)
            return parquet.schema_arrow.names, meta.num_rows
        finally:
            parquet.close()


def check_file(path: str, table: str, gzip_check_bytes: int = GZIP_CHECK_BYTES) -> tuple[str | None, int]:
    """Check one file of `table`; returns (a warning or None, gzip bytes decompressed)."""
    source = file_name(path)
    fs, local = split_uri(path)
    size = fs.get_file_info(local).size or 0
    if size == 0:
        raise problem(source, table, "empty file (0 bytes)")
    lower = source.lower()
    rows = None
    checked = 0
    if lower.endswith((".parquet", ".pq")):
        columns, rows = _parquet_columns(fs, local, size, source, table)
    else:
        columns, _ = csv_header(fs, local, source, table)
        if lower.endswith(".gz") and size <= gzip_check_bytes:
            _gzip_stream_ok(fs, local, source, table)
            checked = size
    names, _ = normal_names(columns, table, source)
    check_required(names, table, source, rows)
    return missing_expected(names, table, source), checked


def preflight_omop(root: str, gzip_check_bytes: int = GZIP_CHECK_BYTES, workers: int | None = None) -> Preflight:
    """Check every file of every supported table under `root`; raises the first problem (in
    table/file order, so the message is deterministic) as an OmopSchemaError."""
    started = time.perf_counter()
    tables = find_tables(root)
    if "person" not in tables:
        raise OmopSchemaError(f"OMOP root {root}: no person table (person.csv, person.csv.gz or person.parquet)")
    jobs = [(path, table) for table, paths in tables.items() for path in paths]
    workers = workers or min(4, os.cpu_count() or 1, max(1, len(jobs)))
    result = Preflight(tables=tables, files=len(jobs))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="preflight") as pool:
        futures = [pool.submit(check_file, path, table, gzip_check_bytes) for path, table in jobs]
        try:
            for future in futures:
                warning, checked = future.result()
                result.gzip_bytes_checked += checked
                if warning:
                    result.warnings.append(warning)
        finally:
            for future in futures:
                future.cancel()
    result.seconds = round(time.perf_counter() - started, 3)
    return result
