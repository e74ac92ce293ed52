"""The MLflow registry round trip through a real tracking server on loopback: log the risk model as
a models-from-code pyfunc, register it, move `champion` only to a better model, load it by alias
(in this process and in a fresh one) and get the predictor's and the offline path's risks."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from ehrfm.evaluate.report import evaluate_predictions
from ehrfm.evaluate.stratify import subgroup_table
from ehrfm.mlops.model_card import model_card
from ehrfm.mlops.pyfunc_model import OUTPUT_COLUMNS, records_frame
from ehrfm.mlops.registry import CHAMPION, RISK_MODEL_FILES, log_risk_model, register_if_better
from ehrfm.model.risk import load_risk_model
from ehrfm.serve import model_store
from ehrfm.transfer.predictor import RiskPredictor
from tests.support.risk_model_factory import (
    PGS_IDS,
    labels_at,
    make_person,
    offline_risks,
    offline_timelines,
    person_record,
    write_risk_model,
    write_tokenizer,
)


@pytest.fixture(scope="module")
def tracking(mlflow_server):
    """The loopback server as this module's tracking and registry URI (restored afterwards)."""
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mlflow.set_tracking_uri(mlflow_server)
        mlflow.set_experiment("registry-tests")
        yield mlflow_server
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
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


@pytest.fixture(scope="module")
def t2d_champion(tracking, workdir):
    """Version 1 of ehrfm-t2d, logged from a model directory and registered (promoted: no champion yet)."""
    directory = risk_model(workdir, "t2d-1", seed=1, task="t2d")
    card = card_for(directory)
    uri = log_risk_model(
        directory, "t2d", {"val_auroc": 0.71, "test_auroc": 0.69, "test_auroc_ci_low": float("nan")}, card
    )
    return directory, card, uri, register_if_better(uri, "t2d", 0.71)


def test_champion_round_trip_gives_the_predictor_and_offline_risks(t2d_champion):
    directory, card, uri, registered = t2d_champion
    assert uri.startswith("models:/")
    assert registered["name"] == "ehrfm-t2d" and registered["version"] == 1 and registered["promoted"]
    assert registered["champion_version"] == 1 and registered["previous_champion_version"] is None

    loaded = mlflow.pyfunc.load_model("models:/ehrfm-t2d@champion")
    predictor = RiskPredictor.load(directory)
    (genotyped, plain, times), requests = people()
    records = [predictor.parse(r) for r in requests]
    served = loaded.predict(records_frame(records))
    assert list(served.columns) == list(OUTPUT_COLUMNS) and len(served) == 3
    direct = pd.DataFrame(predictor.predict(records))
    pd.testing.assert_frame_equal(served, direct[list(OUTPUT_COLUMNS)], check_exact=False, rtol=1e-9)
    assert served["has_prs"].tolist() == [True, False, True]
    assert served["unknown_codes"].tolist()[:2] == [1, 0]

    model, spec = load_risk_model(directory)
    offline = offline_risks(
        model,
        spec,
        offline_timelines([genotyped, plain], predictor.tokenizer),
        labels_at([(11, times[0]), (12, times[1])]),
    )
    np.testing.assert_allclose(served["risk"].to_numpy()[:2], offline["risk"], rtol=1e-6)
    np.testing.assert_allclose(served["risk_prs_masked"].to_numpy()[:2], offline["risk_prs_masked"], rtol=1e-6)

    champion = model_store.resolve(f"models:/ehrfm-t2d@{CHAMPION}")
    assert (champion.name, champion.version, champion.version_uri) == ("ehrfm-t2d", "1", "models:/ehrfm-t2d/1")
    assert model_store.load(champion, min_prs_share=0.5).predictor.spec.pgs_ids == PGS_IDS


def test_logged_model_holds_weights_config_tokenizer_and_card_but_no_pickle_or_patient_rows(t2d_champion, tmp_path):
    directory, card, _, _ = t2d_champion
    local = Path(mlflow.artifacts.download_artifacts("models:/ehrfm-t2d/1", dst_path=str(tmp_path)))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    logged = {f for f in files if f.startswith("artifacts/risk_model/")}
    assert logged == {f"artifacts/risk_model/{n}" for n in RISK_MODEL_FILES}
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".parquet"))]
    assert "code/ehrfm/transfer/predictor.py" in files and "pyfunc_model.py" in files
    assert (local / "artifacts" / "model_card.md").read_text() == card
    for name in RISK_MODEL_FILES:
        assert (local / "artifacts" / "risk_model" / name).read_bytes() == (directory / name).read_bytes()
    example = json.loads((local / "input_example.json").read_text())
    assert example["columns"] == ["person"]

    client = MlflowClient()
    version = client.get_model_version("ehrfm-t2d", "1")
    assert version.tags["val_auroc"] == "0.71" and version.tags["ehrfm.task"] == "t2d"
    run = client.get_run(version.run_id)
    assert run.data.metrics == {"val_auroc": 0.71, "test_auroc": 0.69}  # the NaN bound is left out
    assert mlflow.artifacts.load_text(f"runs:/{version.run_id}/model_card.md") == card
    assert "<10" in card and "| sex | other | <10 | " in card


@pytest.mark.e2e  # a new interpreter importing torch, ray and mlflow: ~15-30 s on a shared 2-core machine
def test_a_fresh_process_loads_the_champion_with_the_logged_code(t2d_champion, tmp_path):
    directory, _, _, _ = t2d_champion
    _, requests = people()
    predictor = RiskPredictor.load(directory)
    frame = records_frame([predictor.parse(r) for r in requests])
    (tmp_path / "input.json").write_text(json.dumps(frame["person"].tolist()))
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model('models:/ehrfm-t2d@champion')\n"
        "import ehrfm\n"
        "frame = pd.DataFrame({'person': json.load(open('input.json'))})\n"
        "print(json.dumps({'ehrfm': ehrfm.__file__, 'risk': model.predict(frame)['risk'].tolist()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MLFLOW_TRACKING_URI=mlflow.get_tracking_uri(), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(answer["ehrfm"]).parts[-3:] == ("code", "ehrfm", "__init__.py")  # the logged copy, not the checkout
    expected = [r["risk"] for r in predictor.predict([predictor.parse(r) for r in requests])]
    np.testing.assert_allclose(answer["risk"], expected, rtol=1e-9)


def test_a_worse_model_keeps_the_champion_and_a_better_one_takes_it(tracking, workdir):
    dirs = {seed: risk_model(workdir, f"cad-{seed}", seed=seed, task="cad") for seed in (1, 2)}
    uris = {seed: log_risk_model(d, "cad", {"val_auroc": 0.5}, "# card\n") for seed, d in dirs.items()}
    request = person_record(make_person(21, seed=9, n_visits=6, prs={PGS_IDS[1]: 0.3, PGS_IDS[2]: 1.1}))

    def champion_risk() -> float:
        model = mlflow.pyfunc.load_model("models:/ehrfm-cad@champion")
        return float(model.predict(pd.DataFrame({"person": [json.dumps(request)]}))["risk"][0])

    def own_risk(seed: int) -> float:
        predictor = RiskPredictor.load(dirs[seed])
        return predictor.predict([predictor.parse(request)])[0]["risk"]

    assert not math.isclose(own_risk(1), own_risk(2), rel_tol=1e-6)
    first = register_if_better(uris[1], "cad", 0.70)
    worse = register_if_better(uris[2], "cad", 0.65)
    tie = register_if_better(uris[2], "cad", 0.70)
    assert (first["version"], first["promoted"]) == (1, True)
    assert (worse["version"], worse["promoted"], worse["champion_version"]) == (2, False, 1)
    assert worse["previous_champion_metric"] == 0.70 and "<=" in worse["reason"]
    assert (tie["version"], tie["promoted"], tie["champion_version"]) == (3, False, 1)
    client = MlflowClient()
    assert client.get_model_version_by_alias("ehrfm-cad", CHAMPION).version == "1"
    assert champion_risk() == pytest.approx(own_risk(1), rel=1e-9)

    better = register_if_better(uris[2], "cad", 0.75)  # the same weights, now with a better validation score
    assert (better["version"], better["promoted"], better["previous_champion_version"]) == (4, True, 1)
    assert client.get_model_version_by_alias("ehrfm-cad", CHAMPION).version == "4"
    assert champion_risk() == pytest.approx(own_risk(2), rel=1e-9)
    with pytest.raises(ValueError, match="finite"):
        register_if_better(uris[1], "cad", float("nan"))
    assert len(client.search_model_versions("name='ehrfm-cad'")) == 4
