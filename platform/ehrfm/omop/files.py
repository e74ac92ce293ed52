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

from ehrfm.omop.spec import CDM53_RENAMES, CDM_TABLES

DEFAULT_BATCH_ROWS = 100_000
_CSV_SUFFIXES = (".csv.gz", ".csv", ".tsv.gz", ".tsv")
_PARQUET_SUFFIXES = (".parquet", ".pq")
MALFORMED_LINE_COLUMN = "malformed_line"


class OmopSchemaError(ValueError):
    """A table that cannot be read as its CDM spec: names the table, file and column, never values."""


def _split_uri(location: str) -> tuple[pafs.FileSystem, str]:
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
    fs, base = _split_uri(root)
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


def normalise_names(raw: pa.Table, table: str) -> tuple[pa.Table, list[str]]:
    """Lower-case column names and rename CDM 5.3 names; returns (table, 5.3 names renamed)."""
    names = [name.lstrip("\ufeff").strip().lower() for name in raw.column_names]
    renames = CDM53_RENAMES.get(table, {})
    renamed = [old for old in names if old in renames and renames[old] not in names]
    names = [renames[n] if n in renamed else n for n in names]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise OmopSchemaError(f"{table}: duplicate column names after lower-casing: {', '.join(dupes)}")
    if names != raw.column_names:
        raw = raw.rename_columns(names)
    return raw, renamed


def check_required(columns: list[str], table: str, source: str) -> None:
    """Raise if a CDM v5.4 NOT NULL column is absent from a file's header."""
    present = set(columns)
    missing = [c for c in CDM_TABLES[table].required_columns if c not in present]
    if missing:
        raise OmopSchemaError(f"{table}: file {source} lacks required CDM v5.4 column(s) {', '.join(missing)}")


def _csv_header(fs: pafs.FileSystem, path: str, source: str, table: str) -> tuple[list[str], str]:
    with fs.open_input_stream(path, compression="detect") as stream:
        head = stream.read(1 << 16)
    first = head.decode("utf-8-sig", errors="replace").splitlines()[:1]
    if not first or not first[0].strip():
        raise OmopSchemaError(f"{table}: file {source} is empty (no header line)")
    delimiter = "\t" if first[0].count("\t") > first[0].count(",") else ","
    names = next(csv.reader(io.StringIO(first[0]), delimiter=delimiter))
    return names, delimiter


def _iter_csv(fs: pafs.FileSystem, path: str, table: str, batch_rows: int) -> Iterator[RawBatch]:
    source = file_name(path)
    header, delimiter = _csv_header(fs, path, source, table)
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
    with fs.open_input_stream(path, compression="detect") as stream:
        try:
            reader = pacsv.open_csv(stream, read_options, parse_options, convert_options)
            pending = reader.schema.empty_table()
            emitted = False
            for record_batch in reader:
                pending = pa.concat_tables([pending, pa.Table.from_batches([record_batch])])
                while pending.num_rows >= batch_rows:
                    yield RawBatch(pending.slice(0, batch_rows), source, list(malformed))
                    pending, emitted = pending.slice(batch_rows), True
                    malformed.clear()
        except (pa.ArrowInvalid, UnicodeDecodeError):  # the arrow message may quote cell text
            raise OmopSchemaError(
                f"{table}: file {source} could not be parsed as csv (bad encoding or quoting)"
            ) from None
        if pending.num_rows or malformed or not emitted:
            yield RawBatch(pending, source, list(malformed))


def _iter_parquet(fs: pafs.FileSystem, path: str, table: str, batch_rows: int) -> Iterator[RawBatch]:
    source = file_name(path)
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        if parquet.metadata.num_rows == 0:
            yield RawBatch(parquet.schema_arrow.empty_table(), source)
            return
        for record_batch in parquet.iter_batches(batch_size=batch_rows):
            yield RawBatch(pa.Table.from_batches([record_batch]), source)


def iter_raw_batches(files: list[str], table: str, batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[RawBatch]:
    """Raw batches of a table's files in order, names normalised and required columns checked."""
    if table not in CDM_TABLES:
        raise OmopSchemaError(f"unsupported OMOP table {table!r}")
    for path in files:
        fs, local = _split_uri(path)
        parsed = _table_and_format(file_name(path))
        reader = _iter_parquet if parsed and parsed[1] == "parquet" else _iter_csv
        for batch in reader(fs, local, table, batch_rows):
            batch.table, batch.renamed = normalise_names(batch.table, table)
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
        raise OmopSchemaError(
            f"{table}: files {', '.join(file_name(f) for f in files)} store a column with different types"
        ) from None
