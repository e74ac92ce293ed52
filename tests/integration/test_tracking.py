"""The tracking-server launcher against a real MLflow server on loopback."""

import mlflow
import pytest

from ehrfm.tracking import is_healthy

pytestmark = pytest.mark.mlflow


def test_server_logs_and_reads_back_a_run(mlflow_server):
    assert is_healthy(mlflow_server)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment_id = client.create_experiment("tracking-smoke")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "loss", 1.5, step=3)
    client.set_terminated(run.info.run_id)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.value, m.step) for m in history] == [(1.5, 3)]
