"""The risk model as MLflow sees it: a models-from-code pyfunc (this file is what MLflow runs to
build the model, so nothing is pickled) over a risk-model directory logged as an artifact.

Input: a pandas DataFrame, one row per person, one string column `person` holding a PersonRecord
as JSON (`{"birth_date": "1961-04-02", "sex": "female", "events": [{"code": "SNOMED/44054006",
"time": "2019-05-01T00:00:00", "numeric_value": null}], "prs": {"PGS000001": 0.4},
"prediction_time": null}`; codes as in the training dataset: `<vocabulary_id>/<concept_code>`, the
id form `CONDITION/201826` for concepts its concept table lacked). One JSON column keeps nested
events and partial PRS dicts intact through MLflow's signature enforcement and its REST scoring
format.
Output: a DataFrame with OUTPUT_COLUMNS, one row per input row, in input order.
"""

from __future__ import annotations

import pandas as pd
from mlflow.models import ModelSignature, set_model
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema

from ehrfm.transfer.predictor import RESERVED_CODE_PREFIXES, PersonRecord, RiskPredictor

RISK_MODEL_ARTIFACT = "risk_model"
INPUT_COLUMN = "person"
OUTPUT_COLUMNS = {  # name -> MLflow column type
    "risk": "double",
    "risk_prs_masked": "double",
    "percentile": "double",
    "has_prs": "boolean",
    "unknown_codes": "long",
    "truncated_events": "long",
}


def pyfunc_signature() -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
        outputs=Schema([ColSpec(kind, name) for name, kind in OUTPUT_COLUMNS.items()]),
    )


def records_frame(records: list[PersonRecord]) -> pd.DataFrame:
    """The pyfunc input for a list of records."""
    return pd.DataFrame({INPUT_COLUMN: [r.model_dump_json() for r in records]})


def example_record(predictor: RiskPredictor) -> PersonRecord:
    """A made-up person for the logged input example (never a real patient's record): two of the
    vocabulary's clinical codes and every PGS id at the population mean."""
    codes = [c for c in predictor.tokenizer.code_counts if "/" in c and not c.startswith(RESERVED_CODE_PREFIXES)]
    events = [{"code": code, "time": f"2020-0{1 + 3 * i}-15T00:00:00"} for i, code in enumerate(codes[:2])]
    return PersonRecord.model_validate(
        {
            "birth_date": "1960-01-01",
            "sex": "female",
            "events": events,
            "prs": dict.fromkeys(predictor.spec.pgs_ids, 0.0) or None,
            "prediction_time": "2020-12-31T00:00:00",
        }
    )


def predictions_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
    return frame.astype(
        {
            "risk": "float64",
            "risk_prs_masked": "float64",
            "percentile": "float64",
            "has_prs": "bool",
            "unknown_codes": "int64",
            "truncated_events": "int64",
        }
    )


class RiskModelPyfunc(PythonModel):
    """Loads the artifact directory with RiskPredictor (torch weights_only) and scores rows."""

    def load_context(self, context) -> None:
        self.predictor = RiskPredictor.load(context.artifacts[RISK_MODEL_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if INPUT_COLUMN not in model_input.columns:
            raise ValueError(
                f"input needs a string column {INPUT_COLUMN!r} "
                f"({len(model_input)} rows, columns {list(model_input.columns)})"
            )
        records = []
        for row, text in enumerate(model_input[INPUT_COLUMN]):
            try:
                records.append(self.predictor.parse(text))
            except ValueError as exc:  # pydantic's message names fields and hides the values
                raise ValueError(f"row {row} of {len(model_input)}: {exc}") from None
        return predictions_frame(self.predictor.predict(records))


set_model(RiskModelPyfunc())
