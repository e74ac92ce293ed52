"""Reading timelines/ without Ray or torch: its shard files, and Arrow list columns as flat numpy
values + offsets (how timelines are cut without Python loops over tokens), so the online scorer
imports it cheaply."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa


def timeline_files(data_dir: str | Path) -> list[str]:
    """The timelines/*.parquet shards under a preprocessed directory, in shard order."""
    files = sorted(str(p) for p in (Path(data_dir) / "timelines").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet files in {Path(data_dir) / 'timelines'}")
    return files


def list_values_offsets(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(values of this slice, int64 offsets starting at 0) of a list<...> column."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy().astype(np.int64)
    values = array.flatten().to_numpy(zero_copy_only=False)  # only this slice's values
    return values, offsets - offsets[0]
