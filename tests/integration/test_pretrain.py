"""Pretraining on Ray Train + DeepSpeed on CPU (2 workers, gloo): a ZeRO-3 run with cross-attention
fusion (a few dozen steps of a tiny model on tests/support/timeline_factory.py timelines) learns, logs to the
session's MLflow server and uses the PRS; how the tracking URI is resolved."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest
import torch

from ehrfm.tracking import CLIENT_RETRY_ENV
from tests.support.pretrain_setup import (
    assert_learns,
    assert_uses_the_prs_for_t2d,
    point_the_local_server_at,
    val_losses,
)


@pytest.fixture
def local_server_is_the_session_server(mlflow_server, monkeypatch, tmp_path):
    return point_the_local_server_at(mlflow_server, monkeypatch, tmp_path)


@pytest.mark.mlflow
def test_tracking_uri_is_the_config_then_the_environment_then_the_local_server(
    local_server_is_the_session_server, mlflow_server, tmp_path, monkeypatch
):
    from ehrfm.training.run_logger import resolve_tracking_uri

    children = {p.pid for p in psutil.Process().children(recursive=True)}
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_tracking_uri(store, str(tmp_path)) == store  # explicit store: no server at all
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert resolve_tracking_uri(None, str(tmp_path)) == mlflow_server  # running: reused
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_server  # exported for what the driver starts
    assert {k: os.environ[k] for k in CLIENT_RETRY_ENV} == CLIENT_RETRY_ENV
    assert {p.pid for p in psutil.Process().children(recursive=True)} == children
    assert not local_server_is_the_session_server.exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert resolve_tracking_uri(None, "s3://bucket/runs") == "http://mlflow.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ValueError, match="s3://bucket/runs is remote"):
        resolve_tracking_uri(None, "s3://bucket/runs")


# ---- Ray Train + DeepSpeed runs -------------------------------------------------------------
# the data, storage and runner are the session's (tests/support/pretrain_runs.py): the cross_zero3
# reference run is trained once for integration and e2e alike
@pytest.fixture
def timelines(pretrain_timelines):
    return pretrain_timelines


@pytest.fixture
def storage(pretrain_storage) -> Path:
    return pretrain_storage


@pytest.fixture
def datasets(pretrain_datasets):
    return pretrain_datasets


@pytest.mark.mlflow
@pytest.mark.ray
def test_zero3_with_cross_attention_fusion_pretrains(cross_zero3, timelines, mlflow_server):
    result, state = cross_zero3
    assert_learns(state, timelines.vocab_size)
    assert state["step"] == 30 and state["restarts"] == 0 and state["tokens_seen"] > 30 * 16 * 20
    checkpoint = Path(result.checkpoint)
    assert sorted(p.name for p in checkpoint.parent.glob("checkpoint_0*")) == [
        "checkpoint_0000020",
        "checkpoint_0000030",
    ]
    weights = torch.load(checkpoint / "model.pt", weights_only=True)  # plain tensors, safe to load
    from ehrfm.training.checkpoint import DEEPSPEED_SAFE_GLOBALS

    shards = sorted((checkpoint / "deepspeed" / "state").glob("*.pt"))
    assert len(shards) == 4  # model + ZeRO-3 optimiser partition of each of the 2 ranks
    with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):  # what resuming loads, weights_only
        assert all(isinstance(torch.load(p, weights_only=True), dict) for p in shards)
    gates = [v.item() for k, v in weights.items() if k.endswith("cross.gate")]
    assert len(gates) == 2 and all(abs(g) > 1e-3 for g in gates)  # the cross-attention gates opened
    # Logged to MLflow by rank 0: params once, metrics on the step axis, throughput.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs(
        [client.get_experiment_by_name("ehrfm-pretrain").experiment_id],
        filter_string=f"tags.`ehrfm.run_dir` = '{result.run_dir}'",
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["config.deepspeed.zero_stage"] == "3" and run.data.params["world_size"] == "2"
    # the model section as trained (filled from the data manifest), and an experiment that opens on runs
    assert run.data.params["config.model.vocab_size"] == str(timelines.vocab_size) != "0"
    assert run.data.params["config.model.num_pgs"] == str(timelines.num_pgs) != "0"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == [5, 10, 15, 20, 25, 30]
    assert [m.value for m in history] == pytest.approx(val_losses(state))
    assert run.data.metrics["tokens_per_s"] > 0 and run.data.metrics["peak_memory_mb_max_worker"] > 0
    metrics = run.data.metrics  # packed windows (the CPU configs' default): most positions are real tokens
    assert metrics["useful_token_fraction"] == pytest.approx(metrics["tokens_per_s"] / metrics["positions_per_s"])
    assert 0.5 < metrics["useful_token_fraction"] <= 1.0
    assert not {"mfu_real_tokens", "mfu_positions"} & set(metrics)  # MFU is a GPU figure


@pytest.mark.ray
@pytest.mark.parametrize("run", ["cross_zero3"])  # prefix_zero2: tests/e2e/test_pretrain.py
def test_pretrained_model_uses_the_prs_for_t2d(run, request, timelines):
    assert_uses_the_prs_for_t2d(request.getfixturevalue(run)[0], timelines)
