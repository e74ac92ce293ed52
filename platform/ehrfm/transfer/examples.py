"""Labels + timelines -> prediction windows: what the model may see at each prediction time.

A window is the last `context` tokens of a person's timeline whose age (days since birth) is at
or before the prediction time's age, right-padded. Because a gap token carries the age of the
event it precedes, the cut never reveals how long it was until the next event. The tokens of the
prediction day itself are included (event times are day-resolution in OMOP's *_date columns);
the labelers exclude anyone whose target or prior evidence falls at or before the prediction
time, so nothing of the outcome is in the window.

Shard by shard (timelines/ are subject-complete shards), so it runs as Ray Data map_batches at
biobank scale with only the small labels table broadcast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ehrfm.constants import PAD_ID
from ehrfm.preprocess.arrow_lists import list_values_offsets, timeline_files

DAY_US = 86_400_000_000
EXAMPLE_COLUMNS = [
    "subject_id",
    "prediction_time",
    "label",
    "split",
    "tokens",
    "ages",
    "length",
    "dropped",
    "prs",
    "has_prs",
]


def read_labels(path: str | Path) -> pa.Table:
    """MEDS labels (subject_id, prediction_time, boolean_value) from a file or a directory of parquet."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no label parquet at {path}")
    table = pa.concat_tables(
        [pq.read_table(f, columns=["subject_id", "prediction_time", "boolean_value"]) for f in files]
    )
    nulls = {c: table[c].null_count for c in table.column_names if table[c].null_count}
    if nulls:
        raise ValueError(f"{path}: null values in label columns {nulls} of {table.num_rows} rows")
    return table.cast(
        pa.schema([("subject_id", pa.int64()), ("prediction_time", pa.timestamp("us")), ("boolean_value", pa.bool_())])
    )


def prediction_ages(prediction_time: pa.Array, birth_date: pa.Array) -> np.ndarray:
    """Whole days from birth to each prediction time (floor), int64."""
    t = pc.cast(prediction_time, pa.timestamp("us")).cast(pa.int64()).to_numpy(zero_copy_only=False)
    b = pc.cast(birth_date, pa.date32()).cast(pa.int32()).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.floor_divide(t, DAY_US) - b


def cut_windows_at(
    tokens: np.ndarray, ages: np.ndarray, offsets: np.ndarray, rows: np.ndarray, cut_ages: np.ndarray, context: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each (timeline row, cut age): the last `context` tokens with age <= cut age.

    Returns tokens [n, context] (PAD on the right), ages [n, context], length [n], dropped [n]
    (earlier history left out of the window). Ages within a timeline never decrease.
    """
    n = len(rows)
    out_tokens = np.full((n, context), PAD_ID, dtype=np.int32)
    out_ages = np.zeros((n, context), dtype=np.int32)
    lengths = np.zeros(n, dtype=np.int32)
    dropped = np.zeros(n, dtype=np.int32)
    for i, (row, cut) in enumerate(zip(rows, cut_ages)):
        lo, hi = offsets[row], offsets[row + 1]
        end = lo + int(np.searchsorted(ages[lo:hi], cut, side="right"))
        start = max(lo, end - context)
        length = end - start
        out_tokens[i, :length] = tokens[start:end]
        out_ages[i, :length] = ages[start:end]
        lengths[i], dropped[i] = length, start - lo
    return out_tokens, out_ages, lengths, dropped


def prediction_windows(timelines: pa.Table, labels: pa.Table, context: int) -> pa.Table:
    """Example rows (EXAMPLE_COLUMNS) for the labels whose subject is in this timelines shard."""
    ids = timelines["subject_id"].to_numpy()
    order = np.argsort(ids, kind="stable")
    label_ids = labels["subject_id"].to_numpy()
    pos = np.searchsorted(ids[order], label_ids).clip(0, max(len(ids) - 1, 0))
    found = (ids[order][pos] == label_ids) if len(ids) else np.zeros(len(label_ids), dtype=bool)
    labels = labels.filter(pa.array(found))
    rows = order[pos[found]]
    tokens, offsets = list_values_offsets(timelines["tokens"])
    ages, _ = list_values_offsets(timelines["ages"])
    taken = pa.array(rows, pa.int64())
    cut = prediction_ages(
        labels["prediction_time"].combine_chunks(), timelines["birth_date"].take(taken).combine_chunks()
    )
    win_tokens, win_ages, lengths, dropped = cut_windows_at(tokens, ages, offsets, rows, cut, context)
    empty = int((lengths == 0).sum())
    if empty:
        raise ValueError(
            f"{empty} of {len(lengths)} prediction times fall before the person's birth (no tokens to score)"
        )
    return pa.table(
        {
            "subject_id": labels["subject_id"],
            "prediction_time": labels["prediction_time"],
            "label": labels["boolean_value"],
            "split": timelines["split"].take(taken),
            "tokens": pa.FixedSizeListArray.from_arrays(pa.array(win_tokens.ravel(), pa.int32()), context),
            "ages": pa.FixedSizeListArray.from_arrays(pa.array(win_ages.ravel(), pa.int32()), context),
            "length": pa.array(lengths, pa.int32()),
            "dropped": pa.array(dropped, pa.int32()),
            "prs": timelines["prs"].take(taken),
            "has_prs": timelines["has_prs"].take(taken),
        }
    )


def build_examples(data_dir: str | Path, labels: pa.Table, context: int) -> pa.Table:
    """Windows for every label row, shard by shard, in (shard, label) order; errors on unknown subjects."""
    parts = [prediction_windows(pq.read_table(f), labels, context) for f in timeline_files(data_dir)]
    examples = pa.concat_tables(parts) if parts else None
    found = 0 if examples is None else examples.num_rows
    if found != labels.num_rows:
        raise ValueError(
            f"{labels.num_rows - found} of {labels.num_rows} labeled subjects are not in "
            f"{Path(data_dir) / 'timelines'} (labels from another cohort?)"
        )
    return examples


def example_tensors(batch: pa.Table | dict) -> dict[str, torch.Tensor]:
    """An Arrow/numpy batch of examples -> model inputs (tokens, ages, length, prs, has_prs, label)."""

    def column(name):
        value = batch[name]
        if isinstance(value, (pa.Array, pa.ChunkedArray)):
            value = value.combine_chunks() if isinstance(value, pa.ChunkedArray) else value
            if pa.types.is_fixed_size_list(value.type) or pa.types.is_list(value.type):
                width = value.type.list_size if pa.types.is_fixed_size_list(value.type) else None
                flat = value.flatten().to_numpy(zero_copy_only=False)
                return flat.reshape(len(value), width if width is not None else -1)
            return value.to_numpy(zero_copy_only=False)
        value = np.asarray(value)
        return np.stack(value) if value.dtype == object else value

    return {
        "tokens": torch.from_numpy(np.array(column("tokens"), dtype=np.int64, copy=True)),
        "ages": torch.from_numpy(np.array(column("ages"), dtype=np.int32, copy=True)),
        "length": torch.from_numpy(np.array(column("length"), dtype=np.int64, copy=True)),
        "prs": torch.from_numpy(np.array(column("prs"), dtype=np.float32, copy=True)),
        "has_prs": torch.from_numpy(np.asarray(column("has_prs"), dtype=bool)),
        "label": torch.from_numpy(np.asarray(column("label"), dtype=np.float32)),
    }
