"""What tests/{integration,e2e}/test_registry.py share: the loopback server as tracking and registry URI, risk-model
directories with a model card, hand-made persons, and version 1 of ehrfm-t2d (the fixtures stay in the test
modules and call these)."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest

from ehrfm.evaluate.report import evaluate_predictions
from ehrfm.evaluate.stratify import subgroup_table
from ehrfm.mlops.model_card import model_card
from ehrfm.mlops.registry import log_risk_model, register_if_better
from ehrfm.model.risk import load_risk_model
from tests.support.risk_model_factory import PGS_IDS, make_person, person_record, write_risk_model, write_tokenizer


@contextlib.contextmanager
def registry_tracking(mlflow_server: str) -> Iterator[str]:
    """The loopback server as this module's tracking and registry URI (restored afterwards)."""
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mlflow.set_tracking_uri(mlflow_server)
        mlflow.set_experiment("registry-tests")
        yield mlflow_server
    mlflow.set_tracking_uri(previous)


def make_workdir(root: Path) -> Path:
    write_tokenizer(root / "tokenizer.json")
    return root


def risk_model(workdir: Path, name: str, seed: int, task: str) -> Path:
    directory = write_risk_model(workdir / name, workdir / "tokenizer.json", seed=seed, task=task)
    (directory / "predictions.parquet").write_bytes(b"patient-level rows that must never be logged")
    return directory


def card_for(directory: Path) -> str:
    _, spec = load_risk_model(directory)
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.2
    score = np.clip(0.2 + 0.3 * y + rng.normal(0, 0.2, 300), 0, 1)
    sex = np.where(rng.random(300) < 0.5, "female", "male")
    sex[:7] = "other"  # a 7-person subgroup: its counts and metrics must be suppressed
    subgroups = subgroup_table(y, score, {"sex": sex}, n_boot=50)
    return model_card(
        spec,
        {"persons_train": 1400, "persons_val": 300, "positives_val": int(y.sum()), "positives_rare_group": 4},
        [evaluate_predictions("risk", y, score, n_boot=50)],
        subgroups,
    )


def people() -> tuple[list, list[dict]]:
    genotyped = make_person(
        11, seed=1, n_visits=8, prs={k: 0.8 - 0.5 * i for i, k in enumerate(PGS_IDS)}, unknown_code=True
    )
    plain = make_person(12, seed=2, n_visits=5, sex=8507)
    times = [
        dt.datetime.combine(genotyped.visits[5][1], dt.time(9)),
        dt.datetime.combine(plain.visits[3][1], dt.time(9)),
    ]
    partial = {**person_record(make_person(13, seed=3, n_visits=4)), "prs": {PGS_IDS[0]: 1.5, PGS_IDS[3]: -0.2}}
    return [genotyped, plain, times], [person_record(genotyped, times[0]), person_record(plain, times[1]), partial]


def register_t2d_champion(workdir: Path):
    """Version 1 of ehrfm-t2d, logged from a model directory and registered (promoted: no champion yet).

    Run again in the same session (the e2e module after the integration one), the same seed gives the same
    weights, registered as a later version that ties and so leaves the first as champion."""
    directory = risk_model(workdir, "t2d-1", seed=1, task="t2d")
    card = card_for(directory)
    uri = log_risk_model(
        directory, "t2d", {"val_auroc": 0.71, "test_auroc": 0.69, "test_auroc_ci_low": float("nan")}, card
    )
    return directory, card, uri, register_if_better(uri, "t2d", 0.71)
