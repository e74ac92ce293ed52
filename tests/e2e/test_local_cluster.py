"""The local multi-node launcher: a real 2-node Ray cluster (head + 1 worker) with token auth.

The cluster lives in its own short temp dir with non-default ports, so it never touches the test
session's `ray_cluster` or the user's ~/.ray/auth_token, and `down` stops only its own processes.
Jobs are submitted the documented way: `ray job submit --working-dir . --runtime-env
cluster/runtime_env.yaml -- python ...` from the repository root; the pretraining job gets the
session's real MLflow server through MLFLOW_TRACKING_URI in the runtime env's env_vars.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from ehrfm.cluster.auth import AUTH_MODE_VAR, TOKEN_PATH_VAR, TOKEN_VAR
from ehrfm.cluster.local import LocalClusterSpec, alive_nodes, down, free_port, status, up
from tests.support.timeline_factory import write_timelines

REPO_ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def local_cluster():
    state_dir = Path(tempfile.mkdtemp(prefix="ehrfm-lc-", dir="/tmp"))  # short: Ray's socket paths
    spec = LocalClusterSpec(
        state_dir=state_dir,
        workers=1,
        head_cpus=1,
        worker_cpus=1,
        dashboard_port=free_port(),
        object_store_bytes=80 * 1024**2,
    )
    cluster = up(spec)
    pids = [node.pid for node in cluster.nodes]
    try:
        yield cluster
    finally:
        assert down(state_dir)
        assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        shutil.rmtree(state_dir, ignore_errors=True)


CONVENTION = ("--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml")


def _submit(
    env: dict[str, str], *entrypoint: str, runtime_env: tuple[str, ...] = CONVENTION, timeout_s: float = 300
) -> subprocess.CompletedProcess:
    command = [RAY, "job", "submit", *runtime_env, "--", *entrypoint]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)


def _smoke_report(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("EHRFM_SMOKE "))
    return json.loads(line.removeprefix("EHRFM_SMOKE "))


def _without_token(env: dict[str, str], home: Path) -> dict[str, str]:
    """A client with no token anywhere: no variables and a HOME without ~/.ray/auth_token."""
    clean = {k: v for k, v in env.items() if k not in (AUTH_MODE_VAR, TOKEN_PATH_VAR, TOKEN_VAR)}
    clean["HOME"] = str(home)
    return clean


def _jobs(cluster) -> list[dict]:
    request = urllib.request.Request(
        f"{cluster.dashboard_url}/api/jobs/",
        headers={"Authorization": f"Bearer {cluster.token_path.read_text().strip()}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def _job_count(cluster) -> int:
    return len(_jobs(cluster))


@pytest.mark.e2e
def test_two_nodes_up_with_token_auth_and_loopback_dashboard(local_cluster):
    report = status(local_cluster.state_dir)
    assert report["running"] and report["alive_nodes"] == 2
    assert report["processes"] == {"head": True, "worker-0": True}
    nodes = alive_nodes(local_cluster.dashboard_url, local_cluster.token_path)
    assert sorted(node["is_head_node"] for node in nodes) == [False, True]
    assert [node["resources_total"]["CPU"] for node in nodes] == [1.0, 1.0]
    assert local_cluster.dashboard_url.startswith("http://127.0.0.1:")
    assert (local_cluster.token_path.stat().st_mode & 0o777) == 0o600
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{local_cluster.dashboard_url}/api/v0/nodes", timeout=10)
    assert missing.value.code == 401
    wrong = urllib.request.Request(
        f"{local_cluster.dashboard_url}/api/v0/nodes", headers={"Authorization": "Bearer " + "0" * 64}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(wrong, timeout=10)
    assert refused.value.code == 403


@pytest.mark.e2e
def test_submitted_job_imports_the_uploaded_package_on_every_node(local_cluster):
    done = _submit(local_cluster.client_env(), "python", "cluster/smoke_job.py", "--expect-nodes", "2")
    report = _smoke_report(done)
    assert len(report["nodes"]) == 2
    # `ehrfm` comes from the working dir Ray unpacked on each node, not from this checkout's install
    for where in [report["driver"], *report["nodes"].values()]:
        assert where["ehrfm"] == str(Path(where["cwd"]) / "platform" / "ehrfm" / "__init__.py")
        assert str(local_cluster.temp_dir) in where["cwd"]
        assert not where["ehrfm"].startswith(str(REPO_ROOT))


@pytest.mark.e2e
def test_code_already_on_the_nodes_runs_with_a_local_working_dir(local_cluster, tmp_path):
    """The KubeRay convention: the image holds the code, the runtime env names it `local://`."""
    image_dir = tmp_path / "image"
    for part in ("platform", "cluster"):
        shutil.copytree(REPO_ROOT / part, image_dir / part, ignore=shutil.ignore_patterns("__pycache__"))
    runtime_env = json.dumps({"working_dir": f"local://{image_dir}", "env_vars": {"PYTHONPATH": "platform"}})
    done = _submit(
        local_cluster.client_env(),
        "python",
        "cluster/smoke_job.py",
        "--expect-nodes",
        "2",
        runtime_env=("--runtime-env-json", runtime_env),
    )
    report = _smoke_report(done)
    expected = str(image_dir / "platform" / "ehrfm" / "__init__.py")
    assert [where["ehrfm"] for where in [report["driver"], *report["nodes"].values()]] == [expected] * 3


# A few steps of the small CPU config: 2 Ray Train workers of 0.5 CPU fit the cluster's 2 CPUs (one
# per node) and leave one for Ray Data. Train loss every 2 steps, validation + checkpoint every 3.
SHORT_PRETRAIN = (
    "schedule.max_steps=6",
    "schedule.log_every=2",
    "schedule.val_every=3",
    "schedule.checkpoint_every=3",
    "optim.warmup_steps=2",
    "scaling.num_workers=2",
    "scaling.cpus_per_worker=0.5",
)


@pytest.mark.mlflow
@pytest.mark.e2e
def test_pretrain_job_trains_and_logs_its_run_to_the_tracking_server(local_cluster, mlflow_server, tmp_path):
    timelines = write_timelines(tmp_path / "data", persons=120, files=2, max_events=150)
    storage, name = tmp_path / "runs", "cluster-pretrain"
    runtime_env = yaml.safe_load((REPO_ROOT / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] = mlflow_server  # how jobs find the server
    done = _submit(
        local_cluster.client_env(),
        "python",
        "jobs/pretrain.py",
        "--config",
        "jobs/configs/pretrain-cpu-small.yaml",
        "--data",
        str(timelines.root),
        "--storage",
        str(storage),
        "--name",
        name,
        *SHORT_PRETRAIN,
        runtime_env=("--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env)),
        timeout_s=900,
    )  # ~3 min on a loaded 2-core machine; DeepSpeed's first run also builds its CPU op
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [job] = [job for job in _jobs(local_cluster) if f"--name {name}" in job["entrypoint"]]
    assert job["status"] == "SUCCEEDED"
    run_dir = storage.resolve() / name
    summary = json.loads((run_dir / "pretrain_result.json").read_text())
    assert summary["tracking_uri"] == mlflow_server and summary["run_dir"] == str(run_dir)
    assert Path(summary["checkpoint"]).name == "checkpoint_0000006"
    state = json.loads((Path(summary["checkpoint"]) / "train_state.json").read_text())
    assert state["step"] == 6 and [point["step"] for point in state["history"]] == [3, 6]

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("ehrfm-pretrain")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`ehrfm.run_dir` = '{run_dir}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == name
    run = runs[0]
    assert run.data.params["world_size"] == "2" and run.data.params["config.schedule.max_steps"] == "6"
    train_loss = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in train_loss] == [2, 4, 6]  # max_steps / log_every points, once each
    assert all(0 < m.value < 2 * math.log(timelines.vocab_size) for m in train_loss)
    assert train_loss[-1].value < train_loss[0].value  # it trained
    val_loss = client.get_metric_history(run.info.run_id, "val_loss")
    assert [(m.step, m.value) for m in val_loss] == [
        (p["step"], pytest.approx(p["val_loss"])) for p in state["history"]
    ]


@pytest.mark.e2e
def test_submit_without_or_with_a_wrong_token_is_refused(local_cluster, tmp_path):
    jobs_before = _job_count(local_cluster)
    anonymous = _without_token(local_cluster.client_env(), tmp_path)
    refused = _submit(anonymous, "python", "-c", "print('should never run')")
    assert refused.returncode != 0
    assert "Unauthorized: Missing authentication token" in refused.stdout + refused.stderr

    wrong_token = tmp_path / "wrong_token"
    wrong_token.write_text("f" * 64)
    impostor = local_cluster.client_env()
    impostor[TOKEN_PATH_VAR] = str(wrong_token)
    refused = _submit(impostor, "python", "-c", "print('should never run')")
    assert refused.returncode != 0
    assert "Invalid authentication token" in refused.stdout + refused.stderr
    assert _job_count(local_cluster) == jobs_before


@pytest.mark.e2e
def test_up_after_a_crashed_head_clears_its_leftovers_and_down_leaves_nothing():
    state_dir = Path(tempfile.mkdtemp(prefix="ehrfm-lc-", dir="/tmp"))
    spec = LocalClusterSpec(state_dir=state_dir, workers=0, dashboard_port=free_port(), object_store_bytes=80 * 1024**2)
    try:
        first = up(spec)
        head = psutil.Process(first.nodes[0].pid)
        orphans = head.children(recursive=True)
        assert any("raylet" in p.name() for p in orphans)
        head.kill()  # the `ray start` process dies; its raylet, GCS and dashboard live on
        head.wait(timeout=30)
        assert any(p.is_running() and p.status() != "zombie" for p in orphans)
        second = up(spec)  # sees the dead head, clears what it left, starts afresh
        assert second.nodes[0].pid != first.nodes[0].pid
        assert not [p for p in orphans if p.is_running() and p.status() != "zombie"]
        assert status(state_dir)["alive_nodes"] == 1
        survivors = psutil.Process(second.nodes[0].pid).children(recursive=True)
    finally:
        down(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
    assert not [p for p in survivors if p.is_running() and p.status() != "zombie"]
