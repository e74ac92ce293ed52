"""The MLflow server restarts while a job is logging: the job waits it out and nothing is lost.

The job is a real subprocess that finds the server through `ensure_tracking_uri` and so logs with
its client retry settings (the test removes any MLFLOW_HTTP_* of its own from the job's
environment). The server is a real `mlflow server` on SQLite, stopped and started again on the
same port and store while the job is mid-loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest

from ehrfm.cluster.local import free_port
from ehrfm.tracking import CLIENT_RETRY_ENV, ServerSettings, start_server

STEPS = 40
RESTART_AT_STEP = 8
DOWN_SECONDS = 3.0

JOB = textwrap.dedent(
    """
    import json, os, sys, time
    import mlflow
    from ehrfm.tracking import ensure_tracking_uri

    steps, progress, result = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    mlflow.set_tracking_uri(ensure_tracking_uri())
    mlflow.set_experiment("restart-fault")
    latencies = []
    with mlflow.start_run(run_name="logs-through-restart") as run:
        mlflow.log_param("steps", steps)
        for step in range(steps):
            started = time.monotonic()
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
            latencies.append(time.monotonic() - started)
            with open(progress, "w") as handle:
                handle.write(str(step))
            time.sleep(0.05)
    retry_env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_HTTP_REQUEST_")}
    with open(result, "w") as handle:
        json.dump({"run_id": run.info.run_id, "latencies": latencies, "retry_env": retry_env}, handle)
    """
)


def _wait_for_step(progress: Path, step: int, job: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if job.poll() is not None:
            pytest.fail(f"job exited early with code {job.returncode}")
        if progress.is_file() and progress.read_text().strip() and int(progress.read_text()) >= step:
            return
        time.sleep(0.1)
    pytest.fail(f"job did not reach step {step} in {timeout_s:.0f}s")


@pytest.mark.e2e
def test_job_logs_through_a_server_restart_without_losing_anything(tmp_path):
    settings = ServerSettings(state_dir=tmp_path / "mlflow", port=free_port())
    server = start_server(settings)
    script, progress, result = tmp_path / "job.py", tmp_path / "progress", tmp_path / "result.json"
    script.write_text(JOB)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST_")}
    env["MLFLOW_TRACKING_URI"] = settings.url
    job = subprocess.Popen(
        [sys.executable, str(script), str(STEPS), str(progress), str(result)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for_step(progress, RESTART_AT_STEP, job)
        server.terminate()
        server.wait(timeout=60)
        assert job.poll() is None, "the job must still be logging while the server is down"
        time.sleep(DOWN_SECONDS)
        assert int(progress.read_text()) < STEPS - 1, "the job finished while the server was down"
        server = start_server(settings)  # same port, same SQLite store and artifact root
        output, _ = job.communicate(timeout=300)
        assert job.returncode == 0, output[-3000:]

        report = json.loads(result.read_text())
        assert report["retry_env"] == CLIENT_RETRY_ENV
        print(f"slowest log_metric call: {max(report['latencies']):.1f}s (server down >= {DOWN_SECONDS}s)")
        assert max(report["latencies"]) >= DOWN_SECONDS  # a call waited through the outage
        client = mlflow.MlflowClient(tracking_uri=settings.url)
        experiment = client.get_experiment_by_name("restart-fault")
        runs = client.search_runs([experiment.experiment_id])
        assert [run.info.run_id for run in runs] == [report["run_id"]]
        run = runs[0]
        assert run.info.status == "FINISHED"
        assert run.data.params == {"steps": str(STEPS)}
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
        assert history == [(step, 1.0 / (step + 1)) for step in range(STEPS)]
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        server.terminate()
        server.wait(timeout=60)
