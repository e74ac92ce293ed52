"""Scoring and explaining validated records with a RiskPredictor, one outcome per record.

A replica scores a dynamic batch of unrelated requests in one call, so one request's problem
must not fail the others: each record gets either a result or a field-level error. Nothing
here logs or echoes record values in errors (counts and field names only).

Explanations are by occlusion, not gradients: each event inside the model's window (the most
recent ones up to the prediction time, at most `max_events`) is left out once and the person is
rescored (same tokenizer, same window rule); events older than the window contribute nothing;
an event's contribution is risk(with it) - risk(without it), on the calibrated probability
scale. The PRS contribution is risk - risk with the PRS masked (the model's missing-PRS path).
Occluding an event also drops the value and gap tokens it brings and, when the window is full,
lets one older event back in, which is what "this person without that event" means.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ehrfm.constants import UNK_ID
from ehrfm.transfer.predictor import PersonRecord, RiskPredictor, check_pgs_ids

EXPLAIN_METHOD = "occlusion"
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def result_fields(row: dict[str, Any]) -> dict[str, Any]:
    """The public fields of one predictor row, with the PRS contribution added."""
    return {
        "risk": float(row["risk"]),
        "risk_prs_masked": float(row["risk_prs_masked"]),
        "prs_contribution": float(row["risk"] - row["risk_prs_masked"]),
        "percentile": _finite_or_none(row["percentile"]),
        "has_prs": bool(row["has_prs"]),
        "unknown_codes": int(row["unknown_codes"]),
        "truncated_events": int(row["truncated_events"]),
    }


def field_error(loc: tuple, message: str, kind: str = "value_error") -> dict[str, Any]:
    return {"error": {"loc": list(loc), "msg": message, "type": kind}}


def _model_errors(predictor: RiskPredictor, record: PersonRecord) -> dict[str, Any] | None:
    """Checks that depend on the loaded model (the API layer cannot know its PGS ids)."""
    if record.prs:
        try:
            check_pgs_ids(record.prs, predictor.spec.pgs_ids)
        except ValueError as exc:
            return field_error(("prs",), str(exc))
        for pgs, value in record.prs.items():
            if abs(value) > _FLOAT32_MAX:  # the model reads float32: it would become inf
                return field_error(("prs", pgs), "is beyond the float32 range")
    return None


def _outcome(row: dict[str, Any]) -> dict[str, Any]:
    if not (math.isfinite(row["risk"]) and math.isfinite(row["risk_prs_masked"])):
        return field_error((), "the model gives no finite risk for these values", kind="value_error")
    return {"result": result_fields(row)}


def score_records(predictor: RiskPredictor, records: list[PersonRecord]) -> list[dict[str, Any]]:
    """`{"result": {...}}` or `{"error": {...}}` per record, in order. A failure of the whole
    batch falls back to scoring one record at a time, so it stays with the record that caused it."""
    outcomes: list[dict[str, Any] | None] = [_model_errors(predictor, r) for r in records]
    todo = [i for i, outcome in enumerate(outcomes) if outcome is None]
    try:
        rows = predictor.predict([records[i] for i in todo])
    except Exception:  # noqa: BLE001  (isolated below, per record)
        rows = None
    if rows is not None:
        for i, row in zip(todo, rows):
            outcomes[i] = _outcome(row)
        return outcomes
    for i in todo:
        try:
            outcomes[i] = _outcome(predictor.predict([records[i]])[0])
        except Exception as exc:  # noqa: BLE001  (type only: the message could hold values)
            outcomes[i] = field_error((), f"scoring failed ({type(exc).__name__})", kind="scoring_error")
    return outcomes


def _events_in_window(predictor: RiskPredictor, record: PersonRecord) -> int:
    """How many of the most recent events reach the model: the code tokens in its windows (the
    birth-time demographic codes are older than every event, so they leave the windows first)."""
    windows = predictor.windows([record])
    lengths = windows.window_lengths[0]
    per_window = windows.tokens[0].reshape(len(lengths), -1)
    real = np.arange(per_window.shape[1])[None, :] < lengths[:, None]
    is_code = (per_window == UNK_ID) | (per_window >= predictor.first_code_token)
    return int((is_code & real).sum())


def explain_record(predictor: RiskPredictor, record: PersonRecord, max_events: int, top_k: int) -> dict[str, Any]:
    """The person's score plus the `top_k` events (of those in the window, at most `max_events`
    most recent) whose removal changes the risk most, largest |change| first."""
    error = _model_errors(predictor, record)
    if error is not None:
        return error
    when = record.scored_time()
    eligible = [i for i, event in enumerate(record.events) if event.time.date() <= when.date()]
    eligible.sort(key=lambda i: record.events[i].time)
    pinned = record.model_copy(update={"prediction_time": when})  # stays defined with fewer events
    try:
        n_considered = min(max_events, len(eligible), _events_in_window(predictor, pinned))
        considered = eligible[len(eligible) - n_considered :]
        variants = [pinned] + [
            pinned.model_copy(update={"events": [e for j, e in enumerate(record.events) if j != i]}) for i in considered
        ]
        rows = predictor.predict(variants)
    except Exception as exc:  # noqa: BLE001  (type only: the message could hold values)
        return field_error((), f"scoring failed ({type(exc).__name__})", kind="scoring_error")
    scored = _outcome(rows[0])
    if "error" in scored:
        return scored
    base = rows[0]["risk"]
    deltas = [(i, base - row["risk"]) for i, row in zip(considered, rows[1:])]
    contributions = sorted((d for d in deltas if math.isfinite(d[1])), key=lambda item: -abs(item[1]))
    events = [
        {
            "index": i,
            "code": record.events[i].code,
            "time": record.events[i].time.isoformat(),
            "contribution": float(delta),
        }
        for i, delta in contributions[:top_k]
    ]
    return {
        "result": {
            **scored["result"],
            "method": EXPLAIN_METHOD,
            "events": events,
            "events_considered": len(considered),
            "events_not_considered": len(eligible) - len(considered),
        }
    }
