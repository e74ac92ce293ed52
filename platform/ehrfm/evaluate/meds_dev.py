"""Predictions in the MEDS-DEV form, so results compare with other MEDS models.

One row per prediction time: `subject_id` int64, `prediction_time` timestamp[us], `boolean_value`
(the label) and the model's `predicted_boolean_probability` float64 and `predicted_boolean_value`
(probability >= the stated threshold; 0.5 unless the caller passes the validation-chosen one).
The label columns are checked with `meds.LabelSchema` (meds 0.4.1 defines no prediction schema,
and its label schema admits no extra columns, so the predicted columns are checked here).
"""

from __future__ import annotations

import meds
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("prediction_time", pa.timestamp("us"), nullable=False),
        pa.field("boolean_value", pa.bool_()),
        pa.field("predicted_boolean_value", pa.bool_(), nullable=False),
        pa.field("predicted_boolean_probability", pa.float64(), nullable=False),
    ]
)
PREDICTED = ("predicted_boolean_value", "predicted_boolean_probability")


def prediction_table(subject_id, prediction_time, label, probability, threshold: float = 0.5) -> pa.Table:
    """The MEDS-DEV prediction table of one model's scores (`threshold` decides the boolean)."""
    probability = np.asarray(probability, dtype=np.float64)
    table = pa.table(
        {
            "subject_id": pa.array(np.asarray(subject_id, dtype=np.int64)),
            "prediction_time": pa.array(prediction_time).cast(pa.timestamp("us")),
            "boolean_value": pa.array(np.asarray(label).astype(bool)),
            "predicted_boolean_value": pa.array(probability >= threshold),
            "predicted_boolean_probability": pa.array(probability),
        },
        schema=PREDICTION_SCHEMA,
    )
    validate_predictions(table)
    return table


def validate_predictions(table: pa.Table) -> None:
    """Raise ValueError (column names and counts only) unless `table` is a MEDS-DEV prediction table."""
    missing = [name for name in PREDICTION_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"MEDS-DEV predictions: column(s) {', '.join(missing)} missing")
    labels = table.select([n for n in table.column_names if n not in PREDICTED])
    try:
        meds.LabelSchema.validate(labels)
    except Exception as exc:  # names columns and types, never values
        raise ValueError(f"MEDS-DEV predictions do not match meds.LabelSchema: {' '.join(str(exc).split())}") from None
    for name in PREDICTED:
        want = PREDICTION_SCHEMA.field(name).type
        if table.schema.field(name).type != want:
            raise ValueError(f"MEDS-DEV predictions: {name} is {table.schema.field(name).type}, want {want}")
        if table[name].null_count:
            raise ValueError(f"MEDS-DEV predictions: {table[name].null_count} null {name}")
    probability = table["predicted_boolean_probability"].to_numpy()
    outside = int(((probability < 0) | (probability > 1) | np.isnan(probability)).sum())
    if outside:
        raise ValueError(f"MEDS-DEV predictions: {outside} probabilities outside [0, 1]")


def write_predictions(table: pa.Table, path) -> None:
    validate_predictions(table)
    pq.write_table(table, path)
