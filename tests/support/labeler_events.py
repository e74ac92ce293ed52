"""Hand-made MEDS event tables for tests/{unit,integration}/test_labeler.py: rows of (subject, day, code[, value[,
visit_id]]) as EVENT_SCHEMA tables, many subjects with visits, and the shipped t2d task with overrides."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa

from ehrfm.schemas import EVENT_SCHEMA
from ehrfm.tasks.definitions import TaskDefinition, load_task

T0 = datetime(2010, 1, 1, 9, 0)


def day(d: float) -> datetime:
    return T0 + timedelta(days=d)


def events(rows: list[tuple]) -> pa.Table:
    """Rows (subject, day, code[, value[, visit_id]]) -> an EVENT_SCHEMA table; day None = static."""
    cols = {name: [] for name in EVENT_SCHEMA.names}
    for row in rows:
        subject, when, code, value, visit = (list(row) + [None, None])[:5]
        cols["subject_id"].append(subject)
        cols["time"].append(None if when is None else day(when))
        cols["code"].append(code)
        cols["numeric_value"].append(value)
        cols["visit_id"].append(visit)
        cols["visit_type"].append(None if visit is None else "9202")
    return pa.table(cols, schema=EVENT_SCHEMA)


def t2d_task(**changes) -> TaskDefinition:
    return load_task("t2d", [f"{k}={v}" for k, v in changes.items()])


def many_visit_events(n_subjects: int, rng: np.random.Generator) -> pa.Table:
    rows = []
    for s in range(1, n_subjects + 1):
        n_visits = int(rng.integers(2, 7))
        starts = np.sort(rng.choice(3000, size=n_visits, replace=False))
        for v, start in enumerate(starts):
            rows.append((s, float(start), "VISIT/9202", None, s * 100 + v))
            rows.append((s, float(start) + float(rng.integers(0, 5)), "CONDITION/260139", None, s * 100 + v))
    return events(rows)
