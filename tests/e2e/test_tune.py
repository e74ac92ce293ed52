"""Ray Tune sweeps of fine-tuning runs (each trial drives a Ray Train TorchTrainer) on the tiny
timelines of tests/support/finetune_factory.py with PRS labels (label = PRS column 0 > 0), on the shared
2-CPU Ray cluster and a real MLflow server.

The ASHA sweep is made deterministic: its first three trials are fixed points, two learning
rates that learn (0.03, 0.01) and one that cannot (1e-7), and two trials fit the cluster at a time
(2 CPUs, 0.75 per trial, 0.5 kept free), so the third starts only after a learner has left its slot,
i.e. after learners have reached the first rung, and arrives there far below them: it is stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ehrfm.config import dump_config
from ehrfm.tune.search_space import Dimension
from ehrfm.tune.sweep import load_sweep
from tests.support.finetune_factory import make_labels, write_finetune_data, write_pretrained
from tests.support.risk_model_factory import write_tokenizer

pytestmark = pytest.mark.mlflow

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "jobs" / "configs" / "tune-t2d.yaml"
FAST = [
    "finetune.train.batch_size=16",
    "finetune.train.shuffle_buffer=64",
    "finetune.train.eval_batch_size=64",
    "finetune.scaling.torch_threads=1",
    "finetune.train.modality_dropout=0.0",
    "finetune.model.head_dropout=0.0",
    "resources.headroom_cpus=0.5",
    "registry.n_boot=50",
    "include_default=false",
    "search=optuna",
]
LEARNS, LEARNS_TOO, CANNOT_LEARN = 0.03, 0.01, 1e-7


# ---- sweeps on Ray --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune-inputs")
    info = write_finetune_data(root / "data")
    write_tokenizer(info.root / "tokenizer.json")  # a real tokenizer: the registry loads the winner as served
    make_labels(info, root / "labels.parquet", "prs")
    return SimpleNamespace(
        data=info.root, labels=root / "labels.parquet", pretrained=write_pretrained(info, root / "pretrain").parent
    )


def sweep_inputs(inputs, storage: Path, name: str, *overrides: str):
    sweep, base = load_sweep(CONFIG, FAST + list(overrides))
    base.data.dir, base.data.labels, base.model.pretrained = (
        str(inputs.data),
        str(inputs.labels),
        str(inputs.pretrained),
    )
    sweep.storage_path, sweep.name = str(storage), name
    return sweep, base


def champion_metric(client) -> float | None:
    try:
        return float(client.get_model_version_by_alias("ehrfm-t2d", "champion").tags["val_auroc"])
    except Exception:  # no registered model or no champion yet
        return None


@pytest.fixture(scope="module")
def asha(ray_cluster, inputs, mlflow_server, tmp_path_factory):
    """A 4-trial sweep: the three fixed points first, then an Optuna point; 3 epochs, ASHA rungs 1, 2."""
    from mlflow import MlflowClient

    from ehrfm.tune.sweep import run_sweep

    sweep, base = sweep_inputs(
        inputs,
        tmp_path_factory.mktemp("sweeps"),
        "asha",
        "finetune.scaling.cpus_per_worker=0.5",
        f"finetune.mlflow.tracking_uri={mlflow_server}",
    )
    sweep.space = {
        "optim.head_lr": Dimension(loguniform=(1e-3, 3e-2)),
        "optim.weight_decay": Dimension(loguniform=(1e-4, 1e-1)),
    }
    sweep.points_to_evaluate = [{"optim.head_lr": rate} for rate in (LEARNS, LEARNS_TOO, CANNOT_LEARN)]
    sweep.num_samples, sweep.scheduler.max_epochs = 4, 3
    before = champion_metric(MlflowClient(tracking_uri=mlflow_server))
    return run_sweep(sweep, base), before


def by_rate(result: dict) -> dict[float, dict]:
    return {t["config"]["optim.head_lr"]: t for t in result["trials"]}


@pytest.mark.ray
@pytest.mark.e2e
def test_asha_stops_the_trial_that_cannot_learn_and_keeps_the_best(asha):
    result, _ = asha
    assert result["search"] == "optuna" and result["max_concurrent_trials"] == 2 and result["max_epochs"] == 3
    trials = result["trials"]
    assert len(trials) == 4 and {t["outcome"] for t in trials} <= {"completed", "early_stopped"}
    stuck = by_rate(result)[CANNOT_LEARN]
    assert (stuck["outcome"], stuck["epochs"]) == ("early_stopped", 1)  # below the first rung's cutoff
    # the two learners run side by side; which one reaches a rung second (and may be cut) varies
    assert "completed" in {by_rate(result)[rate]["outcome"] for rate in (LEARNS, LEARNS_TOO)}
    assert all(t["epochs"] == 3 for t in trials if t["outcome"] == "completed")
    sweep_dir = Path(result["sweep_dir"])
    for trial in trials:  # one Tune result per epoch reported by the Train workers
        lines = (sweep_dir / "tune" / f"trial_{trial['trial_id']}" / "result.json").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == list(range(1, trial["epochs"] + 1))
    best = max(trials, key=lambda t: t["best_val_auroc"])
    assert result["best_trial_id"] == best["trial_id"] and result["best_config"] == best["config"]
    assert result["best_val_auroc"] == best["best_val_auroc"] > 0.8 > stuck["best_val_auroc"]


@pytest.mark.ray
@pytest.mark.e2e
def test_the_best_trial_is_scored_on_test_once_into_a_finetune_directory(asha):
    from ehrfm.metrics import auroc
    from ehrfm.model.risk import load_risk_model

    result, _ = asha
    best_dir = Path(result["best_dir"])
    summary = json.loads((best_dir / "finetune_result.json").read_text())
    assert summary["trial_id"] == result["best_trial_id"]
    assert summary["train_run"].endswith(f"trials/{result['best_trial_id']}")
    # the driver re-scores the kept epoch: the same val AUROC the trial reported to Tune
    assert summary["metrics"]["val_auroc"] == pytest.approx(result["best_val_auroc"], abs=1e-6)
    predictions = pq.read_table(best_dir / "predictions.parquet")
    test = predictions.filter(pc.equal(predictions["split"], "test"))
    assert test.num_rows > 0
    assert result["test_auroc"] == pytest.approx(
        auroc(test["label"].to_numpy(zero_copy_only=False), test["logit"].to_numpy())
    )
    _, spec = load_risk_model(best_dir / "model")
    assert spec.platt is not None and spec.metrics == summary["metrics"]
    assert not list((best_dir.parent / "trials").glob("*/predictions.parquet"))  # no trial saw the test split


@pytest.mark.ray
@pytest.mark.e2e
def test_sweep_is_a_parent_run_with_a_child_run_per_trial(asha, mlflow_server):
    from mlflow import MlflowClient

    result, _ = asha
    client = MlflowClient(tracking_uri=mlflow_server)
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["ehrfm.sweep"] == "asha"
    assert parent.data.metrics["trials"] == 4 and parent.data.metrics["trials_early_stopped"] >= 1
    assert parent.data.metrics["best_val_auroc"] == pytest.approx(result["best_val_auroc"])
    assert parent.data.tags["ehrfm.tune.best_trial_id"] == result["best_trial_id"]
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    trials = {t["trial_id"]: t for t in result["trials"]}
    assert sorted(c.data.tags["ehrfm.tune.trial_id"] for c in children) == sorted(trials)
    for child in children:
        trial = trials[child.data.tags["ehrfm.tune.trial_id"]]
        assert float(child.data.params["hp.optim.head_lr"]) == pytest.approx(trial["config"]["optim.head_lr"])
        assert child.data.tags["ehrfm.tune.outcome"] == trial["outcome"]
        assert child.data.metrics["best_val_auroc"] == pytest.approx(trial["best_val_auroc"])
        history = client.get_metric_history(child.info.run_id, "val_auroc")
        if trial["outcome"] == "completed":  # per-epoch validation AUROC, logged by the Train run's rank 0
            assert child.info.status == "FINISHED" and [p.step for p in history] == [1, 2, 3]
            assert max(p.value for p in history) == pytest.approx(trial["best_val_auroc"])
        else:  # stopped by ASHA: its run was aborted, the child marked killed
            assert child.info.status == "KILLED" and history[0].step == 1


@pytest.mark.ray
@pytest.mark.e2e
def test_winner_goes_through_the_champion_rule(asha, mlflow_server, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from ehrfm.tracking import mlflow_tracking

    result, before = asha
    registry = result["registry"]
    assert registry["name"] == "ehrfm-t2d" and registry["metric"] == pytest.approx(result["best_val_auroc"])
    assert registry["promoted"] == (before is None or result["best_val_auroc"] > before)
    client = MlflowClient(tracking_uri=mlflow_server)
    version = client.get_model_version("ehrfm-t2d", str(registry["version"]))
    assert version.tags["ehrfm.tune.trial_id"] == result["best_trial_id"]
    if registry["promoted"]:
        champion = client.get_model_version_by_alias("ehrfm-t2d", "champion")
        assert champion.version == version.version
        uri = "models:/ehrfm-t2d@champion"
    else:
        uri = f"models:/ehrfm-t2d/{version.version}"
    with mlflow_tracking(mlflow_server):  # models:/ URIs resolve through the global registry URI
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path)))
    weights = next(local.rglob("model.pt"))
    assert weights.read_bytes() == (Path(result["model_dir"]) / "model.pt").read_bytes()


def recorded_trials(tune_dir: Path) -> dict[str, tuple[str, int]]:
    """trial id -> (status, iterations) in the newest experiment state Tune has written."""
    files = sorted(tune_dir.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    try:
        state = json.loads(files[-1].read_text()) if files else {"trial_data": []}
    except (json.JSONDecodeError, OSError):  # caught mid-write
        return {}
    out = {}
    for trial_json, runtime_json in state["trial_data"]:
        trial, runtime = json.loads(trial_json), json.loads(runtime_json)
        last = runtime.get("last_result") or {}
        out[trial["trial_id"]] = (trial["status"], int(last.get("training_iteration", 0)))
    return out


@pytest.mark.ray
@pytest.mark.e2e
def test_killed_sweep_driver_is_restored_without_rerunning_finished_trials(
    ray_cluster, inputs, mlflow_server, tmp_path
):
    from mlflow import MlflowClient

    from ehrfm.tune.sweep import main

    sweep, _ = sweep_inputs(inputs, tmp_path, "unused")
    sweep.space = {"optim.head_lr": Dimension(loguniform=(1e-3, 3e-2))}
    sweep.points_to_evaluate = [{"optim.head_lr": 0.03}, {"optim.head_lr": 0.01}]
    sweep.num_samples, sweep.scheduler.max_epochs = 2, 2
    sweep.finetune_config = str(REPO / "jobs" / "configs" / "finetune-t2d.yaml")
    sweep.finetune_overrides += [o.removeprefix("finetune.") for o in FAST if o.startswith("finetune.")]
    config = tmp_path / "sweep.yaml"
    config.write_text(dump_config(sweep))
    storage = tmp_path / "sweeps"
    args = [
        "--config",
        str(config),
        "--task",
        "t2d",
        "--pretrained",
        str(inputs.pretrained),
        "--data",
        str(inputs.data),
        "--labels",
        str(inputs.labels),
        "--name",
        "resumable",
        "--storage",
        str(storage),
        f"finetune.mlflow.tracking_uri={mlflow_server}",
        "registry.enabled=false",
    ]
    env = os.environ | {
        "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
        "TUNE_GLOBAL_CHECKPOINT_S": "1",
    }  # the experiment state catches up within a second
    tune_dir = storage / "resumable" / "tune"
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(
            [sys.executable, str(REPO / "jobs" / "tune.py"), *args],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline, states = time.monotonic() + 300, {}
        while time.monotonic() < deadline and driver.poll() is None:
            states = recorded_trials(tune_dir)
            if any(status == "TERMINATED" for status, _ in states.values()):
                break
            time.sleep(0.5)
        running = driver.poll() is None
        driver.kill()
        driver.wait(timeout=60)
    assert running, (tmp_path / "driver.log").read_text()[-3000:]
    finished = [tid for tid, (status, _) in states.items() if status == "TERMINATED"]
    assert len(finished) == 1, states  # killed after the first trial finished, before the second did
    first = finished[0]
    first_results = (tune_dir / f"trial_{first}" / "result.json").read_text()
    assert states[first][1] == 2 and len(first_results.splitlines()) == 2
    assert not (storage / "resumable" / "sweep_result.json").exists()

    assert main(args) == 0  # the same command again: Tuner.restore
    result = json.loads((storage / "resumable" / "sweep_result.json").read_text())
    assert [t["outcome"] for t in result["trials"]] == ["completed", "completed"]
    assert first in {t["trial_id"] for t in result["trials"]} and all(t["epochs"] == 2 for t in result["trials"])
    assert (tune_dir / f"trial_{first}" / "result.json").read_text() == first_results  # not run again
    assert recorded_trials(tune_dir)[first] == ("TERMINATED", 2)
    client = MlflowClient(tracking_uri=mlflow_server)
    child = client.search_runs(
        [client.get_experiment_by_name("ehrfm-tune").experiment_id],
        filter_string=f"tags.`ehrfm.tune.trial_id` = '{first}'",
    )
    assert len(child) == 1 and child[0].data.tags["mlflow.parentRunId"] == result["parent_run_id"]
    assert [p.step for p in client.get_metric_history(child[0].info.run_id, "val_auroc")] == [1, 2]
