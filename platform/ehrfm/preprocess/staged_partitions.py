"""Rows partitioned by an integer key into parquet files on disk, in place of a Ray Data shuffle.

A Ray Data groupby moves every row through the object store and spills what does not fit; at 1M
persons that is ~450M events, ~50 GB of spill. Here each map task writes its rows straight to
`<root>/<key>=<K>/<stem>.parquet` (the key's leading `_` dropped) (one file per task and key) and returns only row counts; a
second step reads one key's files at a time. Memory: a task's write buffer, or one partition.

The stem names the task's input, so a retried task rewrites the same files and nothing doubles.
Rows of one key keep their order within a file; files are read back in name order, so a
partition's row order does not depend on task scheduling.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FLUSH_ROWS = 1_000_000  # rows a writer buffers before it splits them by key (~60 MB of events)


def partition_dir(root: Path | str, key: str, value: int) -> Path:
    return Path(root) / f"{key.lstrip('_')}={value:05d}"


class PartitionedWriter:
    """Buffers tables that carry an int `key` column and appends each key's rows (without the
    key column) to that key's file for this `stem`; `close()` returns the rows written per key."""

    def __init__(self, root: Path | str, stem: str, key: str, schema: pa.Schema, flush_rows: int = FLUSH_ROWS) -> None:
        self.root, self.stem, self.key, self.schema, self.flush_rows = Path(root), stem, key, schema, flush_rows
        self.file_schema = schema.remove(schema.get_field_index(key))
        self.rows: dict[int, int] = {}
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._writers: dict[int, pq.ParquetWriter] = {}

    def __enter__(self) -> PartitionedWriter:
        return self

    def __exit__(self, error: type[BaseException] | None, *_: object) -> None:
        if error is None:
            self.close()
        else:  # the task fails and its retry rewrites these files: only release them
            self._close_files()

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._buffer.append(table.select(self.schema.names).cast(self.schema))
        self._buffered += table.num_rows
        if self._buffered >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        table = pa.concat_tables(self._buffer)
        self._buffer, self._buffered = [], 0
        column = table[self.key]
        if column.null_count:
            raise ValueError(f"{self.stem}: {column.null_count} rows have no {self.key}")
        keys = column.to_numpy()
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        table = table.drop_columns([self.key]).take(pa.array(order))
        values, starts = np.unique(keys, return_index=True)
        for value, start, end in zip(values.tolist(), starts.tolist(), [*starts[1:].tolist(), len(keys)]):
            self._writer(value).write_table(table.slice(start, end - start))
            self.rows[value] = self.rows.get(value, 0) + end - start

    def _writer(self, value: int) -> pq.ParquetWriter:
        if value not in self._writers:
            directory = partition_dir(self.root, self.key, value)
            directory.mkdir(parents=True, exist_ok=True)
            self._writers[value] = pq.ParquetWriter(directory / f"{self.stem}.parquet", self.file_schema)
        return self._writers[value]

    def close(self) -> dict[int, int]:
        try:
            self.flush()
        finally:
            self._close_files()
        return self.rows

    def _close_files(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


def partition_values(root: Path | str, key: str) -> list[int]:
    """The key values that have a partition under `root`, ascending (none when root is absent)."""
    root, prefix = Path(root), f"{key.lstrip('_')}="
    if not root.is_dir():
        return []
    return sorted(int(p.name[len(prefix) :]) for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix))


def read_partition(root: Path | str, key: str, value: int) -> pa.Table:
    """All rows of one partition, its files in name order."""
    files = sorted(partition_dir(root, key, value).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"partition {key}={value} under {root} has no files")
    return pa.concat_tables([pq.read_table(f) for f in files])
