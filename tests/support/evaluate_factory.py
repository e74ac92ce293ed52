"""A tiny hand-made task for the evaluation tests: events, PRS, splits, labels, predictions, a truth.

The outcome depends on a count of SIGNAL codes and on 1.5 x PGS000002 (the truth's T2D score)
for the genotyped, so the PRS's contribution is known.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ehrfm.meds.layout import to_meds_split
from ehrfm.schemas import EVENT_SCHEMA, prs_schema
from ehrfm.tasks.labeler import LABEL_SCHEMA
from ehrfm_synthetic.params import TRAITS, GenerativeParams
from ehrfm_synthetic.truth import ONSETS

PT = datetime(2020, 6, 1)
N = 240
PGS_IDS = ["PGS000001", "PGS000002", "PGS000003"]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _events(subjects: np.ndarray, signal: np.ndarray, rng: np.random.Generator) -> pa.Table:
    """Birth, sex (static `Gender/F` or `Gender/M`, as the MEDS dataset writes it), `signal` SIGNAL codes
    and a few noise codes per person, all before PT."""
    subj, times, codes = [], [], []
    for s, k in zip(subjects, signal):
        birth = PT - timedelta(days=float(rng.uniform(40, 75) * 365.25))
        noise = rng.integers(1, 6)
        subj += [s] * (2 + k + noise)
        times += [birth, None] + [PT - timedelta(days=float(d)) for d in rng.uniform(1, 900, k + noise)]
        codes += (
            ["MEDS_BIRTH", rng.choice(["Gender/F", "Gender/M"])]
            + ["CONDITION/999"] * k
            + [f"CONDITION/{c}" for c in rng.integers(100, 106, noise)]
        )
    n = len(subj)
    return pa.table(
        {
            "subject_id": np.asarray(subj, np.int64),
            "time": times,
            "code": codes,
            "numeric_value": [None] * n,
            "visit_id": [None] * n,
            "visit_type": [None] * n,
        },
        schema=EVENT_SCHEMA,
    )


def _timestamps(days_from_pt: np.ndarray) -> pa.Array:
    """Days relative to PT (NaN = never) as timestamp[ms]."""
    stamps = [None if np.isnan(d) else PT + timedelta(days=float(d)) for d in days_from_pt]
    return pa.array(stamps, pa.timestamp("ms"))


def _truth(root: Path, subjects: np.ndarray, liability: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A truth/ dir the oracle can read; returns the T2D onset (days from PT, NaN = none)."""
    n = subjects.size
    ancestry = rng.choice(["EUR", "AFR"], n)
    group_mean = np.where(ancestry == "EUR", 0.0, 0.3)
    onset_t2d = np.where(rng.random(n) < 0.35, rng.uniform(-400, 1500, n), np.nan)
    cols = {
        "person_id": subjects,
        "ancestry": ancestry,
        "male": rng.random(n) < 0.5,
        "birth_date": pa.array((np.datetime64("1950-01-01") + rng.integers(0, 7000, n)).astype("datetime64[D]")),
        "death": _timestamps(np.full(n, np.nan)),
    }
    for i, trait in enumerate(TRAITS):
        cols[f"liability_{trait}"] = liability if i == 0 else rng.normal(size=n)
        cols[f"group_mean_{trait}"] = group_mean if i == 0 else np.zeros(n)
    cols.update(
        bmi18=rng.normal(23, 3, n),
        bmi_slope=rng.uniform(0, 0.2, n),
        smoke_start_age=np.full(n, np.inf),
        smoke_quit_age=np.full(n, np.inf),
    )
    for disease in ONSETS:
        cols[f"onset_{disease}"] = _timestamps(onset_t2d if disease == "t2d" else np.full(n, np.nan))
    (root / "truth" / "persons").mkdir(parents=True)
    pq.write_table(pa.table(cols), root / "truth" / "persons" / "part-00000.parquet")
    (root / "truth" / "params.json").write_text(GenerativeParams().model_dump_json())
    pq.write_table(
        pa.table({"pgs_id": PGS_IDS, "trait": ["cad", "t2d", ""], "accuracy_reference": [0.5, 0.7, 0.0]}),
        root / "truth" / "pgs.parquet",
    )
    return onset_t2d


def make_task(root: Path, seed: int = 0) -> dict:
    """data/ (events, prs parts + sidecar, splits), labels, predictions and a cohort truth."""
    rng = np.random.default_rng(seed)
    subjects = np.arange(1, N + 1, dtype=np.int64) * 1000
    prs = rng.normal(size=(N, 3)).astype(np.float32)
    has_prs = rng.random(N) < 0.85
    signal = rng.poisson(1.0, N)
    onset = _truth(root / "cohort", subjects, prs[:, 1] + 0.5 * rng.normal(size=N), rng)
    y = (onset <= 730) | (rng.random(N) < _sigmoid(1.2 * signal + 1.5 * prs[:, 1] * has_prs - 3.5))
    split = np.array(["train"] * 140 + ["val"] * 50 + ["test"] * 50)
    data = root / "data"
    (data / "prs").mkdir(parents=True)
    events = _events(subjects, signal, rng)
    split_of_row = split[np.searchsorted(subjects, events["subject_id"].to_numpy())]
    for name in ("train", "val", "test"):  # the MEDS layout preprocess writes (data/<MEDS split>/)
        (data / "data" / to_meds_split(name)).mkdir(parents=True)
        part = events.filter(pa.array(split_of_row == name))
        pq.write_table(part, data / "data" / to_meds_split(name) / "part-00000.parquet")
    pq.write_table(
        pa.table({"subject_id": subjects, "prs": list(prs), "has_prs": has_prs}, schema=prs_schema(3)),
        data / "prs" / "part-00000.parquet",
    )
    (data / "prs" / "pgs_ids.json").write_text(json.dumps(PGS_IDS))
    (data / "metadata").mkdir()
    meds_split = [to_meds_split(name) for name in split]
    pq.write_table(
        pa.table({"subject_id": subjects, "split": meds_split}), data / "metadata" / "subject_splits.parquet"
    )
    labels = pa.table({"subject_id": subjects, "prediction_time": [PT] * N, "boolean_value": y}, schema=LABEL_SCHEMA)
    pq.write_table(labels, root / "labels.parquet")
    logit = 1.2 * signal + 1.5 * prs[:, 1] * has_prs - 3.5 + rng.normal(0, 0.5, N)
    masked = 1.2 * signal - 3.5 + rng.normal(0, 0.5, N)
    keep = split != "train"
    predictions = pa.table(
        {
            "subject_id": subjects[keep],
            "prediction_time": pa.array([PT] * int(keep.sum()), pa.timestamp("us")),
            "split": split[keep],
            "label": y[keep],
            "risk": _sigmoid(logit[keep]),
            "risk_prs_masked": _sigmoid(masked[keep]),
            "logit": logit[keep],
            "logit_prs_masked": masked[keep],
        }
    )
    pq.write_table(predictions, root / "predictions.parquet")
    # a weaker "default fine-tune" beside the headline model (a sweep's winner): a noisier logit
    default_logit = logit + rng.normal(0, 1.5, N)
    pq.write_table(
        predictions.select(["subject_id", "prediction_time", "split", "label"]).append_column(
            "risk", pa.array(_sigmoid(default_logit[keep]))
        ),
        root / "default_predictions.parquet",
    )
    return {
        "data": data,
        "labels": root / "labels.parquet",
        "predictions": root / "predictions.parquet",
        "default_predictions": root / "default_predictions.parquet",
        "default_risk": _sigmoid(default_logit),
        "cohort": root / "cohort",
        "y": y,
        "split": split,
        "subjects": subjects,
        "risk": _sigmoid(logit),
        "masked": _sigmoid(masked),
        "labels_table": labels,
    }
