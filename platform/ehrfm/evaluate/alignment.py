"""Put a model's scores on the label rows they belong to, refusing any file that does not fit.

A predictions file (fine-tuning's predictions.parquet, zero-shot's zero_shot.parquet) is keyed by
(subject_id, prediction_time). Every one of its rows must be a label row, no key may repeat, and
it must score every test label row (every label row, for a cross-fit over all of them); where it
carries `label` or `split` they must agree with the labels and the splits. Several files (one
zero-shot run per split) are read as one, so a key in two of them is a repeat. A file that breaks
any of these is an error naming the counts, never a silent inner join that would evaluate a
different set of persons.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

KEYS = ("subject_id", "prediction_time")
CHECKED = ("label", "split")  # columns that, where a file carries them, must agree with the labels


def _keys(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(pl.Datetime("us")))


def align_scores(
    path: Path | Sequence[Path],
    labels: pa.Table,
    split: np.ndarray | None,
    columns: dict[str, str],
    required_split: str | None = "test",
) -> dict[str, np.ndarray]:
    """`{name: scores}` over all label rows (NaN where the file has no row) for each `{name: column}`.
    `required_split` None: every label row must be scored. `split` None (splits not known yet): the
    files' `split` columns are not checked, and every label row must be scored."""
    if split is None and required_split is not None:
        raise ValueError(f"required_split={required_split!r} needs the label rows' splits")
    paths = [Path(path)] if isinstance(path, str | Path) else [Path(p) for p in path]
    if not paths:
        raise ValueError("no score file given")
    wanted = sorted(set(columns.values()))
    frames = []
    for one in paths:
        frame = pl.read_parquet(one)
        missing = [c for c in (*KEYS, *wanted) if c not in frame.columns]
        if missing:
            raise ValueError(f"{one}: missing columns {missing} (has {frame.columns})")
        shared = [c for c in frame.columns if c in (*KEYS, *wanted, *CHECKED)]
        carries = [pl.lit(c in frame.columns).alias(f"_carries_{c}") for c in CHECKED]  # _agree's rows
        frames.append(_keys(frame.select(shared)).with_columns(carries))
    path = paths[0] if len(paths) == 1 else ", ".join(str(p) for p in paths)  # how errors name the input
    scores = pl.concat(frames, how="diagonal_relaxed")
    n_rows = scores.height
    repeated = n_rows - scores.select(KEYS).unique().height
    if repeated:
        raise ValueError(f"{path}: {repeated} of {n_rows} rows repeat a (subject_id, prediction_time)")
    label_rows = (
        _keys(pl.from_arrow(labels).select(*KEYS, "boolean_value"))
        .with_columns(
            pl.Series("label_split", np.full(labels.num_rows, "") if split is None else np.asarray(split).astype(str))
        )
        .with_row_index("row")
    )
    joined = scores.join(label_rows, on=list(KEYS), how="left")
    unmatched = joined["row"].null_count()
    if unmatched:
        raise ValueError(f"{path}: {unmatched} of {n_rows} rows match no label row ({label_rows.height} label rows)")
    _agree(path, joined, "label", "boolean_value", pl.Boolean)
    if split is not None:
        _agree(path, joined, "split", "label_split", pl.String)
    required = np.ones(labels.num_rows, bool) if required_split is None else np.asarray(split) == required_split
    n_required, what = int(required.sum()), "" if required_split is None else f"{required_split} "
    covered = int(required[joined["row"].to_numpy()].sum())
    if covered != n_required:
        raise ValueError(f"{path}: scores {covered} of {n_required} {what}label rows")
    rows = joined["row"].to_numpy()
    out = {}
    for name, column in columns.items():
        values = np.full(label_rows.height, np.nan)
        values[rows] = joined[column].cast(pl.Float64).to_numpy()
        on_required = values[required]
        bad = int((~np.isfinite(on_required)).sum())
        if bad:
            raise ValueError(f"{path}: column {column!r} is null/NaN on {bad} of {on_required.size} {what}rows")
        out[name] = values
    return out


def _agree(path: Path, joined: pl.DataFrame, column: str, reference: str, dtype: pl.DataType) -> None:
    """Where the file carries `column`, it must equal the labels' `reference` on every row."""
    if column not in joined.columns:
        return
    same = pl.col(column).cast(dtype).eq_missing(pl.col(reference).cast(dtype))
    differ = joined.filter(pl.col(f"_carries_{column}") & ~same).height
    if differ:
        raise ValueError(
            f"{path}: column {column!r} disagrees with the labels/splits on {differ} of {joined.height} rows"
        )
