"""The MLflow registry round trip through a real tracking server on loopback: log the risk model as
a models-from-code pyfunc, register it, move `champion` only to a better model, load it by alias and get
the predictor's and the offline path's risks (in a fresh process: tests/e2e/test_registry.py); the weights'
SHA-256 recorded at registration, and serving's refusal of a version whose files were changed since."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from ehrfm.mlops import checksums
from ehrfm.mlops.pyfunc_model import OUTPUT_COLUMNS, RISK_MODEL_ARTIFACT, records_frame
from ehrfm.mlops.registry import CHAMPION, RISK_MODEL_FILES, log_risk_model, register_if_better
from ehrfm.model.risk import load_risk_model
from ehrfm.serve import model_store
from ehrfm.transfer.predictor import RiskPredictor
from tests.support.registry_models import (
    make_workdir,
    people,
    register_t2d_champion,
    registry_tracking,
    risk_model,
)
from tests.support.risk_model_factory import (
    PGS_IDS,
    labels_at,
    make_person,
    offline_risks,
    offline_timelines,
    person_record,
)

pytestmark = pytest.mark.mlflow


@pytest.fixture(scope="module")
def tracking(mlflow_server):
    with registry_tracking(mlflow_server) as uri:
        yield uri


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module")
def t2d_champion(tracking, workdir):
    """Version 1 of ehrfm-t2d, logged from a model directory and registered (promoted: no champion yet)."""
    return register_t2d_champion(workdir)


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
    assert "| sex | other | <=20 | <=20 | " in card  # the small-count rule (tests/unit/test_model_card.py)


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


def test_registered_version_records_the_sha256_of_each_logged_risk_model_file(t2d_champion):
    directory, _, _, _ = t2d_champion
    version = MlflowClient().get_model_version("ehrfm-t2d", "1")
    expected = {name: checksums.file_sha256(directory / name) for name in RISK_MODEL_FILES}
    assert json.loads(version.tags[checksums.MANIFEST_TAG]) == expected  # names and hex digests only
    assert version.tags[checksums.DIGEST_TAG] == checksums.digest(expected)
    logged = mlflow.artifacts.load_dict(f"runs:/{version.run_id}/{checksums.MANIFEST_FILE}")
    assert logged["files"] == expected and logged[checksums.DIGEST_TAG] == version.tags[checksums.DIGEST_TAG]


def _overwrite_in_artifact_store(model_uri: str, name: str, data: bytes, tmp_path: Path) -> None:
    """Replace one risk-model file of a logged model in the artifact store (through the server's
    artifact proxy, as anyone with write access to the store could), leaving the registry alone."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    model = mlflow.get_logged_model(model_uri.removeprefix("models:/"))
    (tmp_path / name).write_bytes(data)
    get_artifact_repository(model.artifact_location).log_artifact(
        str(tmp_path / name), f"artifacts/{RISK_MODEL_ARTIFACT}"
    )


def test_a_version_whose_weights_changed_after_registration_is_refused(tracking, workdir, tmp_path):
    directory = risk_model(workdir, "ckd-1", seed=3, task="ckd")
    uri = log_risk_model(directory, "ckd", {"val_auroc": 0.6}, "# card\n")
    assert register_if_better(uri, "ckd", 0.60)["version"] == 1
    bare = mlflow.register_model(uri, "ehrfm-ckd")  # plain MLflow: the same files, no checksum tags
    champion = model_store.resolve("models:/ehrfm-ckd@champion")
    unchecked = model_store.resolve(f"models:/ehrfm-ckd/{bare.version}")
    assert model_store.load(champion, min_prs_share=0.5).ref.version == "1"  # intact: verified and loaded
    with pytest.raises(checksums.WeightsChecksumError, match=f"ehrfm-ckd version {bare.version} has no weights_sha256"):
        model_store.load(unchecked, min_prs_share=0.5)
    assert model_store.load(unchecked, min_prs_share=0.5, verify_weights=False).ref.version == bare.version

    weights = (directory / "model.pt").read_bytes()
    _overwrite_in_artifact_store(uri, "model.pt", weights[:-1] + bytes([weights[-1] ^ 1]), tmp_path)
    with pytest.raises(checksums.WeightsChecksumError) as refused:
        model_store.load(champion, min_prs_share=0.5)
    message = str(refused.value)
    assert message.startswith("model ehrfm-ckd version 1: ") and "changed: model.pt)" in message
    assert "refusing to serve" in message and not any(n in message for n in RISK_MODEL_FILES[1:])
