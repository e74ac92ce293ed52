"""The zero-shot stage logs its throughput to MLflow (a real sqlite-backed tracking store)."""

from __future__ import annotations

import pytest

from ehrfm.transfer.zero_shot import ZeroShotConfig, log_throughput_to_mlflow


def test_throughput_goes_to_mlflow_when_a_tracking_uri_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert not log_throughput_to_mlflow({"persons_per_s": 1.0}, ZeroShotConfig())
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("EHRFM_ZERO_SHOT_EXPERIMENT", "zs-test")
    timing = {"persons_per_s": 12.5, "sampled_tokens_per_s": 900.0, "devices": ["cpu"], "sampling_seconds": 3.0}
    assert log_throughput_to_mlflow(timing, ZeroShotConfig())
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("zs-test").experiment_id])
    assert run.data.metrics["persons_per_s"] == 12.5
    assert run.data.params["sync_every"] == "8"
    assert run.data.tags["zero_shot_devices"] == "cpu"
