"""Labels + timelines -> prediction windows: what the model may see at each prediction time.

A window is the last `context` tokens of a person's timeline whose age (days since birth) is at
or before the prediction time's age, right-padded, never the closing EOS (`open_records`). Because a gap token carries the age of the
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

from ehrfm.constants import EOS_ID, PAD_ID
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
# whole-history examples only: real tokens per window [windows], oldest first
WINDOW_LENGTHS = "window_lengths"


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


def open_records(
    tokens: np.ndarray, ages: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat tokens, ages and offsets of timelines with their closing EOS removed. At a prediction
    time the record is still open: that it ends on that day is future information (and online
    requests never carry it), so no window shows it, even when the prediction day is the last one."""
    offsets = np.asarray(offsets, dtype=np.int64)
    closing = offsets[1:] - 1
    ends_with_eos = np.zeros(len(closing), dtype=bool)
    nonempty = offsets[1:] > offsets[:-1]
    ends_with_eos[nonempty] = tokens[closing[nonempty]] == EOS_ID
    keep = np.ones(len(tokens), dtype=bool)
    keep[closing[ends_with_eos]] = False
    removed = np.concatenate([[0], np.cumsum(ends_with_eos)])
    return tokens[keep], ages[keep], offsets - removed


def cut_history_at(
    tokens: np.ndarray,
    ages: np.ndarray,
    offsets: np.ndarray,
    rows: np.ndarray,
    cut_ages: np.ndarray,
    context: int,
    windows: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each (timeline row, cut age): the history up to the cut as `windows` consecutive windows of
    `context` tokens, the newest last. The newest window is the last `context` tokens with age <= cut
    age (what a one-window model sees); each earlier window holds the `context` tokens before the next
    one, so together they are the last `windows * context` tokens; windows before the start of the
    record are empty (length 0).

    Returns tokens [n, windows, context] (PAD on the right of each window), ages [n, windows, context],
    lengths [n, windows], dropped [n] (earlier history left out of all windows). Ages within a timeline
    never decrease.
    """
    if windows < 1:
        raise ValueError(f"windows must be >= 1, got {windows}")
    n = len(rows)
    out_tokens = np.full((n, windows, context), PAD_ID, dtype=np.int32)
    out_ages = np.zeros((n, windows, context), dtype=np.int32)
    lengths = np.zeros((n, windows), dtype=np.int32)
    dropped = np.zeros(n, dtype=np.int32)
    for i, (row, cut) in enumerate(zip(rows, cut_ages)):
        lo, hi = offsets[row], offsets[row + 1]
        end = lo + int(np.searchsorted(ages[lo:hi], cut, side="right"))
        for w in range(windows - 1, -1, -1):
            start = max(lo, end - context)
            length = end - start
            out_tokens[i, w, :length] = tokens[start:end]
            out_ages[i, w, :length] = ages[start:end]
            lengths[i, w] = length
            end = start
        dropped[i] = end - lo
    return out_tokens, out_ages, lengths, dropped


def cut_windows_at(
    tokens: np.ndarray, ages: np.ndarray, offsets: np.ndarray, rows: np.ndarray, cut_ages: np.ndarray, context: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The newest window alone (`cut_history_at` with one window): tokens [n, context] (PAD on the
    right), ages [n, context], length [n], dropped [n]."""
    win_tokens, win_ages, lengths, dropped = cut_history_at(tokens, ages, offsets, rows, cut_ages, context)
    return win_tokens[:, 0], win_ages[:, 0], lengths[:, 0], dropped


def prediction_windows(timelines: pa.Table, labels: pa.Table, context: int, windows: int = 1) -> pa.Table:
    """Example rows (EXAMPLE_COLUMNS) for the labels whose subject is in this timelines shard.

    With `windows` > 1 (whole-history examples, `cut_history_at`), tokens and ages hold the windows
    one after another (oldest first, `windows * context` values), `length` is the newest window's
    length and `window_lengths` has every window's."""
    ids = timelines["subject_id"].to_numpy()
    order = np.argsort(ids, kind="stable")
    label_ids = labels["subject_id"].to_numpy()
    pos = np.searchsorted(ids[order], label_ids).clip(0, max(len(ids) - 1, 0))
    found = (ids[order][pos] == label_ids) if len(ids) else np.zeros(len(label_ids), dtype=bool)
    labels = labels.filter(pa.array(found))
    rows = order[pos[found]]
    tokens, offsets = list_values_offsets(timelines["tokens"])
    ages, _ = list_values_offsets(timelines["ages"])
    tokens, ages, offsets = open_records(tokens, ages, offsets)
    taken = pa.array(rows, pa.int64())
    cut = prediction_ages(
        labels["prediction_time"].combine_chunks(), timelines["birth_date"].take(taken).combine_chunks()
    )
    win_tokens, win_ages, window_lengths, dropped = cut_history_at(tokens, ages, offsets, rows, cut, context, windows)
    lengths = window_lengths[:, -1]
    empty = int((lengths == 0).sum())
    if empty:
        raise ValueError(
            f"{empty} of {len(lengths)} prediction times fall before the person's birth (no tokens to score)"
        )
    width = windows * context
    columns = {
        "subject_id": labels["subject_id"],
        "prediction_time": labels["prediction_time"],
        "label": labels["boolean_value"],
        "split": timelines["split"].take(taken),
        "tokens": pa.FixedSizeListArray.from_arrays(pa.array(win_tokens.ravel(), pa.int32()), width),
        "ages": pa.FixedSizeListArray.from_arrays(pa.array(win_ages.ravel(), pa.int32()), width),
        "length": pa.array(lengths, pa.int32()),
        "dropped": pa.array(dropped, pa.int32()),
        "prs": timelines["prs"].take(taken),
        "has_prs": timelines["has_prs"].take(taken),
    }
    if windows > 1:
        columns[WINDOW_LENGTHS] = pa.FixedSizeListArray.from_arrays(
            pa.array(window_lengths.ravel(), pa.int32()), windows
        )
    return pa.table(columns)


def build_examples(data_dir: str | Path, labels: pa.Table, context: int, windows: int = 1) -> pa.Table:
    """Windows for every label row, shard by shard, in (shard, label) order; errors on unknown subjects."""
    parts = [prediction_windows(pq.read_table(f), labels, context, windows) for f in timeline_files(data_dir)]
    examples = pa.concat_tables(parts) if parts else None
    found = 0 if examples is None else examples.num_rows
    if found != labels.num_rows:
        raise ValueError(
            f"{labels.num_rows - found} of {labels.num_rows} labeled subjects are not in "
            f"{Path(data_dir) / 'timelines'} (labels from another cohort?)"
        )
    return examples


def example_tensors(batch: pa.Table | dict) -> dict[str, torch.Tensor]:
    """An Arrow/numpy batch of examples -> model inputs (tokens, ages, length, prs, has_prs, label).

    Whole-history examples (a `window_lengths` column) give tokens and ages [B, windows, context] and
    length [B, windows], what RiskModel reads as several windows per person."""

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

    tokens = np.array(column("tokens"), dtype=np.int64, copy=True)
    ages = np.array(column("ages"), dtype=np.int32, copy=True)
    has_windows = WINDOW_LENGTHS in (batch.column_names if isinstance(batch, pa.Table) else batch)
    if has_windows:
        length = np.array(column(WINDOW_LENGTHS), dtype=np.int64, copy=True)
        shape = (len(tokens), length.shape[1], -1)
        tokens, ages = tokens.reshape(shape), ages.reshape(shape)
    else:
        length = np.array(column("length"), dtype=np.int64, copy=True)
    return {
        "tokens": torch.from_numpy(tokens),
        "ages": torch.from_numpy(ages),
        "length": torch.from_numpy(length),
        "prs": torch.from_numpy(np.array(column("prs"), dtype=np.float32, copy=True)),
        "has_prs": torch.from_numpy(np.asarray(column("has_prs"), dtype=bool)),
        "label": torch.from_numpy(np.asarray(column("label"), dtype=np.float32)),
    }
