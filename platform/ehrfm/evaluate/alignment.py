"""Put a model's scores on the label rows they belong to, refusing any file that does not fit.

A predictions file (fine-tuning's predictions.parquet, zero-shot's zero_shot.parquet) is keyed by
(subject_id, prediction_time). Every one of its rows must be a label row, no key may repeat, and
it must score every test label row; where it carries `label` or `split` they must agree with the
labels and the splits. A file that breaks any of these is an error naming the counts, never a
silent inner join that would evaluate a different set of persons.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

KEYS = ("subject_id", "prediction_time")


def _keys(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(pl.Datetime("us")))


def align_scores(
    path: Path, labels: pa.Table, split: np.ndarray, columns: dict[str, str], required_split: str = "test"
) -> dict[str, np.ndarray]:
    """`{name: scores}` over all label rows (NaN where the file has no row) for each `{name: column}`."""
    path = Path(path)
    wanted = sorted(set(columns.values()))
    frame = pl.read_parquet(path)
    missing = [c for c in (*KEYS, *wanted) if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (has {frame.columns})")
    scores = _keys(frame)
    n_rows = scores.height
    repeated = n_rows - scores.select(KEYS).unique().height
    if repeated:
        raise ValueError(f"{path}: {repeated} of {n_rows} rows repeat a (subject_id, prediction_time)")
    label_rows = (
        _keys(pl.from_arrow(labels).select(*KEYS, "boolean_value"))
        .with_columns(pl.Series("label_split", np.asarray(split).astype(str)))
        .with_row_index("row")
    )
    joined = scores.join(label_rows, on=list(KEYS), how="left")
    unmatched = joined["row"].null_count()
    if unmatched:
        raise ValueError(f"{path}: {unmatched} of {n_rows} rows match no label row ({label_rows.height} label rows)")
    _agree(path, joined, "label", "boolean_value", pl.Boolean)
    _agree(path, joined, "split", "label_split", pl.String)
    n_required = int((np.asarray(split) == required_split).sum())
    covered = joined.filter(pl.col("label_split") == required_split).height
    if covered != n_required:
        raise ValueError(f"{path}: scores {covered} of {n_required} {required_split} label rows")
    rows = joined["row"].to_numpy()
    out = {}
    for name, column in columns.items():
        values = np.full(label_rows.height, np.nan)
        values[rows] = joined[column].cast(pl.Float64).to_numpy()
        on_required = values[np.asarray(split) == required_split]
        bad = int((~np.isfinite(on_required)).sum())
        if bad:
            raise ValueError(
                f"{path}: column {column!r} is null/NaN on {bad} of {on_required.size} {required_split} rows"
            )
        out[name] = values
    return out


def _agree(path: Path, joined: pl.DataFrame, column: str, reference: str, dtype: pl.DataType) -> None:
    """Where the file carries `column`, it must equal the labels' `reference` on every row."""
    if column not in joined.columns:
        return
    same = pl.col(column).cast(dtype).eq_missing(pl.col(reference).cast(dtype))
    differ = joined.filter(~same).height
    if differ:
        raise ValueError(
            f"{path}: column {column!r} disagrees with the labels/splits on {differ} of {joined.height} rows"
        )
