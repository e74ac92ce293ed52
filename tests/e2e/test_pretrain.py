"""Pretraining end to end on Ray Train + DeepSpeed on CPU (2 workers, gloo): ZeRO-2 with prefix fusion,
resuming after a stop and after a SIGKILLed worker on the same loss curve, an EHR-only model (its driver
SIGKILLed and the run resumed by name) then a PRS adapter
through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ehrfm.model.io import load_state_dict
from tests.support.pretrain_setup import (
    SMALL,
    assert_learns,
    assert_uses_the_prs_for_t2d,
    make_config,
    point_the_local_server_at,
    val_losses,
)


@pytest.fixture
def local_server_is_the_session_server(mlflow_server, monkeypatch, tmp_path):
    return point_the_local_server_at(mlflow_server, monkeypatch, tmp_path)


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


@pytest.fixture(scope="module")
def prefix_zero2(pretrain):
    return pretrain("prefix-zero2", "deepspeed.zero_stage=2", "model.fusion=prefix")


@pytest.mark.mlflow
@pytest.mark.ray
@pytest.mark.e2e
def test_zero2_with_prefix_fusion_pretrains(prefix_zero2, timelines):
    result, state = prefix_zero2
    assert_learns(state, timelines.vocab_size)
    assert result.metrics["step"] == 30 and result.metrics["val_loss"] == pytest.approx(val_losses(state)[-1])


@pytest.mark.ray
@pytest.mark.parametrize("run", [pytest.param("prefix_zero2", marks=pytest.mark.e2e)])  # cross_zero3: tests/integration
def test_pretrained_model_uses_the_prs_for_t2d(run, request, timelines):
    assert_uses_the_prs_for_t2d(request.getfixturevalue(run)[0], timelines)


@pytest.mark.mlflow
@pytest.mark.ray
@pytest.mark.e2e
def test_rerun_resumes_and_a_killed_worker_recovers_on_the_same_curve(pretrain, cross_zero3, storage, mlflow_server):
    _, reference = cross_zero3
    same = ["deepspeed.zero_stage=3", "model.fusion=cross"]
    first, state = pretrain("resumed", *same, "schedule.stop_at_step=15")
    assert state["step"] == 15 and val_losses(state) == pytest.approx(val_losses(reference)[:3], abs=1e-6)
    # Same run again (same storage path + name): resumes from step 15; rank 1 dies once before
    # step 22, FailureConfig restarts the worker group from the last registered checkpoint.
    result, state = pretrain("resumed", *same, "fault.kill_rank_at_step=22")
    marker = storage / "resumed" / ".fault_injected"
    assert marker.read_text().startswith("rank 1 killed before step 22")
    assert state["step"] == 30 and state["restarts"] >= 1
    # Tolerance: same losses to 1e-6 (data windows, RNG and optimiser state are all restored).
    assert val_losses(state) == pytest.approx(val_losses(reference), abs=1e-6)
    assert [p["train_loss"] for p in state["history"]] == pytest.approx(
        [p["train_loss"] for p in reference["history"]], abs=1e-6
    )
    assert state["tokens_seen"] == reference["tokens_seen"]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs(
        [client.get_experiment_by_name("ehrfm-pretrain").experiment_id],
        filter_string=f"tags.`ehrfm.run_dir` = '{result.run_dir}'",
    )
    assert len(runs) == 1  # one MLflow run across the three worker-group starts
    resumes = [m.value for m in client.get_metric_history(runs[0].info.run_id, "resumed_from_step")]
    assert len(resumes) == 2 and all(step in (15, 20) for step in resumes)  # from checkpoints, not step 0


@pytest.mark.mlflow
@pytest.mark.ray
@pytest.mark.e2e
def test_ehr_only_model_then_prs_adapter(
    datasets, timelines, storage, mlflow_server, local_server_is_the_session_server
):
    from ehrfm.training.pretrain import main, run_pretraining

    base_storage = storage / "ehr-only"
    args = [
        "--config",
        str(SMALL),
        "--data",
        str(timelines.root),
        "--storage",
        str(base_storage),
        "--name",
        "ehr-only",
        "model.fusion=none",
        "deepspeed.zero_stage=2",
        "schedule.max_steps=20",
        "schedule.val_every=10",
        "schedule.checkpoint_every=10",
    ]
    # The driver is SIGKILLed once its first checkpoint is registered; the same command (same --name)
    # then resumes from that checkpoint instead of starting again.
    kill_driver_after_first_checkpoint(args, base_storage / "ehr-only", "checkpoint_0000010")
    assert main(args) == 0
    summary = json.loads((base_storage / "ehr-only" / "pretrain_result.json").read_text())
    base_checkpoint = Path(summary["checkpoint"])
    base_state = json.loads((base_checkpoint / "train_state.json").read_text())
    assert val_losses(base_state)[-1] < val_losses(base_state)[0]
    assert summary["tracking_uri"] == mlflow_server  # no URI set: the driver found the local server
    assert not local_server_is_the_session_server.exists()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs(
        [client.get_experiment_by_name("ehrfm-pretrain").experiment_id],
        filter_string=f"tags.`ehrfm.run_dir` = '{summary['run_dir']}'",
    )
    assert len(runs) == 1  # the resumed driver continues the killed driver's MLflow run
    val_history = client.get_metric_history(runs[0].info.run_id, "val_loss")
    assert sorted({m.step for m in val_history}) == [10, 20]
    (resume,) = client.get_metric_history(runs[0].info.run_id, "resumed_from_step")
    assert resume.value in (10.0, 20.0)  # from a registered checkpoint, never from step 0
    # at most one checkpoint interval (10 steps) is redone: the killed driver got no further than the
    # checkpoint the new one resumed from plus 10 steps
    killed_steps = [m.step for m in val_history if m.timestamp < resume.timestamp]
    assert killed_steps and max(killed_steps) - resume.value <= 10

    cfg = make_config(
        timelines,
        storage,
        [
            "run.name=adapter",
            f"run.init_from={base_checkpoint}",
            "mlflow.enabled=false",
            "model.fusion=cross",
            "model.adapter=true",
            "schedule.max_steps=20",
            "schedule.val_every=10",
            "schedule.checkpoint_every=10",
        ],
    )
    result = run_pretraining(cfg, datasets)
    base, adapted = load_state_dict(base_checkpoint), load_state_dict(result.checkpoint)
    prs_keys = {k for k in adapted if k not in base}
    assert prs_keys and all(".cross." in k or k.startswith(("prs_encoder.", "cross_memory.")) for k in prs_keys)
    for key, value in base.items():  # the EHR decoder is frozen: bit-identical weights
        assert torch.equal(adapted[key], value), key
    assert all(abs(adapted[k].item()) > 1e-3 for k in prs_keys if k.endswith("gate"))
    adapter_state = json.loads((Path(result.checkpoint) / "train_state.json").read_text())
    assert val_losses(adapter_state)[-1] < val_losses(base_state)[-1]  # the PRS adds information


def kill_driver_after_first_checkpoint(args: list[str], run_dir: Path, checkpoint: str, timeout: float = 300) -> None:
    """Start `jobs/pretrain.py args` as its own driver process on the session's Ray cluster, wait until
    Ray Train has registered `checkpoint` (its checkpoint-manager snapshot names it), then SIGKILL it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    repo = Path(__file__).resolve().parents[2]
    log = run_dir.parent / "killed-driver.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        driver = subprocess.Popen(
            [sys.executable, str(repo / "jobs" / "pretrain.py"), *args], cwd=repo, env=env, stdout=out, stderr=out
        )
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    try:
        while not (snapshot.is_file() and checkpoint in snapshot.read_text()):
            if driver.poll() is not None:
                tail = log.read_text(errors="replace").splitlines()[-15:]
                raise AssertionError(
                    f"the driver exited ({driver.returncode}) before {checkpoint}:\n" + "\n".join(tail)
                )
            assert time.monotonic() < deadline, f"no {checkpoint} within {timeout} s"
            time.sleep(0.2)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    assert driver.returncode == -signal.SIGKILL
