"""Finding and reading OMOP table files: parquet, csv, csv.gz, local paths or pyarrow-filesystem URIs.

Reads are untyped on purpose: csv cells stay strings so that a bad value can be quarantined with
a reason instead of failing the whole file; parquet keeps its stored types. Column names are
lower-cased and CDM 5.3 names renamed to 5.4 here, so everything downstream sees one naming.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ehrfm.omop.encoding import encoding_problem, strip_utf8_bom
from ehrfm.omop.spec import CDM53_RENAMES, CDM_TABLES

DEFAULT_BATCH_ROWS = 100_000
HEADER_BYTES = 1 << 16  # what is read to find a csv header and sniff its encoding
_CSV_SUFFIXES = (".csv.gz", ".csv", ".tsv.gz", ".tsv")
_PARQUET_SUFFIXES = (".parquet", ".pq")
MALFORMED_LINE_COLUMN = "malformed_line"


class OmopSchemaError(ValueError):
    """A table that cannot be read as its CDM spec: names the table, file and column, never values.

    Messages read `<file>: <table>[.<column>]: <what> [(<count>)]` so that the commands can
    print them as one line.
    """


def problem(source: str, table: str, what: str, column: str | None = None) -> OmopSchemaError:
    """An OmopSchemaError in the one-line layout: file, table(.column), what is wrong."""
    return OmopSchemaError(f"{source}: {table}{'.' + column if column else ''}: {what}")


def split_uri(location: str) -> tuple[pafs.FileSystem, str]:
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(location)


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def _table_and_format(name: str) -> tuple[str, str] | None:
    lower = name.lower()
    for suffix in _CSV_SUFFIXES:
        if lower.endswith(suffix):
            return lower[: -len(suffix)], "csv"
    for suffix in _PARQUET_SUFFIXES:
        if lower.endswith(suffix):
            return lower[: -len(suffix)], "parquet"
    return None


def _is_hidden(name: str) -> bool:
    return name.startswith((".", "_", "~"))


def _part_files(fs: pafs.FileSystem, directory: str, uri_dir: str) -> list[str]:
    selector = pafs.FileSelector(directory, recursive=False)
    parts = [
        info
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File and not _is_hidden(info.base_name) and _table_and_format(info.base_name)
    ]
    return [_join(uri_dir, info.base_name) for info in sorted(parts, key=lambda i: i.base_name)]


def find_tables(root: str) -> dict[str, list[str]]:
    """Supported CDM table -> its files under `root` (a directory path or filesystem URI).

    A table is `<table>.parquet|.csv|.csv.gz` (any case) or a `<table>/` directory of such parts.
    Two sources for one table (e.g. person.csv and person.parquet) are an error, not a guess.
    """
    root = str(root)
    fs, base = split_uri(root)
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        raise OmopSchemaError(f"OMOP root {root} is not a directory")
    found: dict[str, list[str]] = {}
    sources: dict[str, list[str]] = {}
    for entry in sorted(fs.get_file_info(pafs.FileSelector(base, recursive=False)), key=lambda i: i.base_name):
        if _is_hidden(entry.base_name):
            continue
        if entry.type == pafs.FileType.Directory:
            table, files = entry.base_name.lower(), _part_files(fs, entry.path, _join(root, entry.base_name))
        else:
            parsed = _table_and_format(entry.base_name)
            if parsed is None:
                continue
            table, files = parsed[0], [_join(root, entry.base_name)]
        if table not in CDM_TABLES or not files:
            continue
        sources.setdefault(table, []).append(entry.base_name)
        found.setdefault(table, []).extend(files)
    clashes = {t: names for t, names in sources.items() if len(names) > 1}
    if clashes:
        detail = "; ".join(f"{t}: {', '.join(n)}" for t, n in sorted(clashes.items()))
        raise OmopSchemaError(f"OMOP root {root} holds more than one source for a table ({detail})")
    return found


def file_name(path: str) -> str:
    """The base name of a path or URI (what reports and errors show)."""
    return posixpath.basename(path.rstrip("/"))


@dataclass
class RawBatch:
    """A batch of raw rows from one file, with the rows the csv parser could not split."""

    table: pa.Table
    source_file: str
    malformed_lines: list[str] = field(default_factory=list)
    renamed: list[str] = field(default_factory=list)  # CDM 5.3 column names renamed to 5.4


def normal_names(names: list[str], table: str, source: str = "<batch>") -> tuple[list[str], list[str]]:
    """Lower-cased names with CDM 5.3 names renamed; returns (names, 5.3 names renamed)."""
    names = [name.lstrip("\ufeff").strip().lower() for name in names]
    renames = CDM53_RENAMES.get(table, {})
    renamed = [old for old in names if old in renames and renames[old] not in names]
    names = [renames[n] if n in renamed else n for n in names]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise problem(source, table, f"duplicate column name {', '.join(dupes)} after lower-casing")
    return names, renamed


def normalise_names(raw: pa.Table, table: str, source: str = "<batch>") -> tuple[pa.Table, list[str]]:
    """Lower-case column names and rename CDM 5.3 names; returns (table, 5.3 names renamed)."""
    names, renamed = normal_names(raw.column_names, table, source)
    if names != raw.column_names:
        raw = raw.rename_columns(names)
    return raw, renamed


def check_required(columns: list[str], table: str, source: str, rows: int | None = None) -> None:
    """Raise if a column ehrfm needs (CDM v5.4 NOT NULL) is absent from a file's header."""
    present = set(columns)
    missing = [c for c in CDM_TABLES[table].required_columns if c not in present]
    if missing:
        count = f" ({rows:,} rows)" if rows is not None else ""
        what = f"required CDM v5.4 column{'s' if len(missing) > 1 else ''} missing from the header{count}"
        raise problem(
            source, table, what, column=", ".join(missing) if len(missing) == 1 else "{" + ",".join(missing) + "}"
        )


def missing_expected(columns: list[str], table: str, source: str) -> str | None:
    """A warning (not an error) when a file lacks DDL NOT NULL columns ehrfm does not use
    (vocabulary tables: see ColumnSpec.expected); None when none is missing."""
    present = set(columns)
    missing = [c for c in CDM_TABLES[table].expected_columns if c not in present]
    if not missing:
        return None
    names = ", ".join(f"{table}.{c}" for c in missing)
    return f"{source}: {names}: CDM v5.4 NOT NULL column(s) absent, read as empty (not needed to build events)"


def read_head(fs: pafs.FileSystem, path: str, compressed: bool, source: str, table: str) -> tuple[bytes, bool]:
    """The first HEADER_BYTES (decompressed) of a csv file and whether that is the whole file."""
    try:
        with fs.open_input_stream(path, compression="gzip" if compressed else None) as stream:
            head = stream.read(HEADER_BYTES)
    except (OSError, EOFError, pa.ArrowInvalid):
        raise problem(source, table, "gzip stream is corrupt or truncated (cannot decompress the start)") from None
    return head, len(head) < HEADER_BYTES


def csv_header(fs: pafs.FileSystem, path: str, source: str, table: str) -> tuple[list[str], str]:
    """(column names as written, delimiter) of a csv file; refuses empty, non-UTF-8 and binary files."""
    head, complete = read_head(fs, path, path.lower().endswith(".gz"), source, table)
    if not head:
        raise problem(source, table, "empty file (0 bytes, no header line)")
    trouble = encoding_problem(head, complete)
    if trouble:
        raise problem(source, table, trouble)
    text = strip_utf8_bom(head).decode("utf-8", errors="ignore")
    if not text.strip():
        raise problem(source, table, f"empty file (only whitespace in {len(head):,} bytes, no header line)")
    first = text.splitlines()[0] if text.splitlines() else ""
    if not first.strip():
        raise problem(source, table, "the first line is blank (no header line)")
    delimiter = "\t" if first.count("\t") > first.count(",") else ","
    names = next(csv.reader(io.StringIO(first), delimiter=delimiter))
    return names, delimiter


def _iter_csv(fs: pafs.FileSystem, path: str, table: str, batch_rows: int) -> Iterator[RawBatch]:
    source = file_name(path)
    header, delimiter = csv_header(fs, path, source, table)
    names = [n.lstrip("\ufeff").strip().lower() for n in header]
    malformed: list[str] = []

    def on_bad_row(row: pacsv.InvalidRow) -> str:
        malformed.append(row.text)
        return "skip"

    read_options = pacsv.ReadOptions(column_names=names, skip_rows=1, block_size=1 << 22)
    parse_options = pacsv.ParseOptions(
        delimiter=delimiter,
        newlines_in_values=True,
        invalid_row_handler=on_bad_row,
        quote_char=False if delimiter == "\t" else '"',
    )
    convert_options = pacsv.ConvertOptions(
        column_types={n: pa.string() for n in names},
        strings_can_be_null=True,
        null_values=[""],
        quoted_strings_can_be_null=True,
    )
    rows_read = 0
    with fs.open_input_stream(path, compression="detect") as stream:
        reader = None
        try:
            reader = pacsv.open_csv(stream, read_options, parse_options, convert_options)
            pending = reader.schema.empty_table()
            emitted = False
            for record_batch in reader:
                rows_read += record_batch.num_rows
                pending = pa.concat_tables([pending, pa.Table.from_batches([record_batch])])
                while pending.num_rows >= batch_rows:
                    yield RawBatch(pending.slice(0, batch_rows), source, list(malformed))
                    pending, emitted = pending.slice(batch_rows), True
                    malformed.clear()
        except (pa.ArrowInvalid, UnicodeDecodeError):  # the arrow message may quote cell text
            raise problem(
                source, table, f"cannot be parsed as csv after {rows_read:,} rows (bad encoding or quoting)"
            ) from None
        except (OSError, EOFError):  # a truncated or corrupt gzip stream
            raise problem(source, table, f"gzip stream is corrupt or truncated after {rows_read:,} rows") from None
        finally:
            if reader is not None:  # stop its read-ahead thread now, not at interpreter exit
                reader.close()
        if pending.num_rows or malformed or not emitted:
            yield RawBatch(pending, source, list(malformed))


def _iter_parquet(fs: pafs.FileSystem, path: str, table: str, batch_rows: int) -> Iterator[RawBatch]:
    source = file_name(path)
    rows_read = 0
    with fs.open_input_file(path) as handle:
        parquet = open_parquet(handle, source, table)
        try:
            if parquet.metadata.num_rows == 0:
                yield RawBatch(parquet.schema_arrow.empty_table(), source)
                return
            for record_batch in parquet.iter_batches(batch_size=batch_rows):
                rows_read += record_batch.num_rows
                yield RawBatch(pa.Table.from_batches([record_batch]), source)
        except (pa.ArrowInvalid, OSError, EOFError):  # corrupt pages; the message may quote values
            raise problem(
                source, table, f"corrupt parquet data after {rows_read:,} of {parquet.metadata.num_rows:,} rows"
            ) from None
        finally:
            parquet.close()


def open_parquet(handle, source: str, table: str) -> pq.ParquetFile:
    """A ParquetFile over `handle`, or a one-line error when its footer cannot be read."""
    try:
        return pq.ParquetFile(handle)
    except (pa.ArrowInvalid, OSError, EOFError):
        raise problem(source, table, "not a readable parquet file (footer missing or corrupt; truncated?)") from None


def iter_raw_batches(files: list[str], table: str, batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[RawBatch]:
    """Raw batches of a table's files in order, names normalised and required columns checked."""
    if table not in CDM_TABLES:
        raise OmopSchemaError(f"unsupported OMOP table {table!r}")
    for path in files:
        fs, local = split_uri(path)
        parsed = _table_and_format(file_name(path))
        reader = _iter_parquet if parsed and parsed[1] == "parquet" else _iter_csv
        for batch in reader(fs, local, table, batch_rows):
            batch.table, batch.renamed = normalise_names(batch.table, table, batch.source_file)
            check_required(batch.table.column_names, table, batch.source_file)
            yield batch


def read_raw(files: list[str], table: str) -> pa.Table:
    """All rows of a table's files as one untyped table (csv: strings; parquet: as stored).

    Malformed csv lines are not in the result (validate_table quarantines them); use
    iter_raw_batches to see them.
    """
    pieces = [batch.table for batch in iter_raw_batches(files, table)]
    try:
        return pa.concat_tables(pieces, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        raise problem(
            ", ".join(file_name(f) for f in files), table, "the files store a column with different types"
        ) from None
