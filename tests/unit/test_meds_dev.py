"""MEDS-DEV prediction files: the schema, the threshold, refusals."""

from __future__ import annotations

import datetime as dt

import meds
import numpy as np
import pyarrow.parquet as pq
import pytest

from ehrfm.evaluate.meds_dev import PREDICTED, prediction_table, validate_predictions, write_predictions

TIMES = [dt.datetime(2010, 1, 1), dt.datetime(2011, 6, 30, 12), dt.datetime(2012, 3, 3)]


def test_prediction_file_validates_against_the_meds_label_schema_and_round_trips(tmp_path) -> None:
    table = prediction_table([3, 3, 9], np.array(TIMES, dtype="datetime64[ns]"), [1, 0, 0], [0.7, 0.5, 0.2], 0.5)
    assert table.schema.names == [
        "subject_id",
        "prediction_time",
        "boolean_value",
        "predicted_boolean_value",
        "predicted_boolean_probability",
    ]
    assert table["predicted_boolean_value"].to_pylist() == [True, True, False]  # >= threshold
    meds.LabelSchema.validate(table.drop_columns(list(PREDICTED)))
    write_predictions(table, tmp_path / "p.parquet")
    back = pq.read_table(tmp_path / "p.parquet")
    assert back.equals(table) and back["prediction_time"].to_pylist() == TIMES
    validate_predictions(back)


def test_threshold_is_the_one_given() -> None:
    table = prediction_table([1, 2], TIMES[:2], [0, 1], [0.05, 0.2], threshold=0.1)
    assert table["predicted_boolean_value"].to_pylist() == [False, True]


def test_bad_prediction_tables_are_refused_in_one_line() -> None:
    table = prediction_table([1], TIMES[:1], [1], [0.4])
    with pytest.raises(ValueError, match="column\\(s\\) predicted_boolean_probability missing"):
        validate_predictions(table.drop_columns(["predicted_boolean_probability"]))
    with pytest.raises(ValueError, match="1 probabilities outside"):
        prediction_table([1], TIMES[:1], [1], [1.5])
    with pytest.raises(ValueError, match="meds.LabelSchema"):
        validate_predictions(table.set_column(1, "prediction_time", table["prediction_time"].cast("string")))
