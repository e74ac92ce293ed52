"""PartitionedWriter (the "shard_files" strategy's stand-in for a shuffle): every row lands in its
key's file exactly once, in its input order, across flushes; a retried task rewrites, never doubles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ehrfm.preprocess.staged_partitions import PartitionedWriter, partition_dir, partition_values, read_partition

SCHEMA = pa.schema([("row", pa.int64()), ("name", pa.string()), ("_part", pa.int32())])


def _rows(start: int, parts: list[int]) -> pa.Table:
    rows = np.arange(start, start + len(parts))
    return pa.table({"_part": pa.array(parts, pa.int64()), "row": rows, "name": [f"r{r}" for r in rows]})


def _write(root: Path, stem: str, tables: list[pa.Table], flush_rows: int) -> dict[int, int]:
    with PartitionedWriter(root, stem, "_part", SCHEMA, flush_rows=flush_rows) as writer:
        for table in tables:
            writer.add(table)
    return writer.rows


def test_rows_land_in_their_key_file_in_input_order(tmp_path: Path) -> None:
    batches = [_rows(0, [3, 0, 3, 7]), _rows(4, []), _rows(4, [0, 0, 7]), _rows(7, [3])]
    rows = _write(tmp_path, "unit-a", batches, flush_rows=3)  # flushes after the 1st and 3rd batch, and at close
    assert rows == {0: 3, 3: 3, 7: 2}
    assert partition_values(tmp_path, "_part") == [0, 3, 7]
    assert partition_dir(tmp_path, "_part", 3) == tmp_path / "part=00003"
    assert sorted(p.name for p in (tmp_path / "part=00003").iterdir()) == ["unit-a.parquet"]
    assert pq.read_metadata(tmp_path / "part=00003" / "unit-a.parquet").num_row_groups == 2
    three = read_partition(tmp_path, "_part", 3)
    assert three.schema == SCHEMA.remove(2)  # key column dropped, types cast to the schema
    assert three["row"].to_pylist() == [0, 2, 7] and three["name"].to_pylist() == ["r0", "r2", "r7"]
    assert read_partition(tmp_path, "_part", 0)["row"].to_pylist() == [1, 4, 5]


def test_files_of_several_tasks_are_read_in_name_order_and_a_retry_rewrites(tmp_path: Path) -> None:
    _write(tmp_path, "b", [_rows(10, [1, 1])], flush_rows=100)
    _write(tmp_path, "a", [_rows(20, [1, 2])], flush_rows=100)
    _write(tmp_path, "a", [_rows(20, [1, 2])], flush_rows=100)  # the same task again
    assert read_partition(tmp_path, "_part", 1)["row"].to_pylist() == [20, 10, 11]
    assert read_partition(tmp_path, "_part", 2)["row"].to_pylist() == [21]


def test_bad_keys_and_missing_partitions_are_errors(tmp_path: Path) -> None:
    table = pa.table({"_part": pa.array([1, None], pa.int32()), "row": [1, 2], "name": ["x", "y"]})
    with pytest.raises(ValueError, match="unit-z: 1 rows have no _part"):
        _write(tmp_path, "unit-z", [table], flush_rows=10)
    assert partition_values(tmp_path / "absent", "_part") == []
    with pytest.raises(FileNotFoundError, match="part=4"):
        read_partition(tmp_path, "_part", 4)
