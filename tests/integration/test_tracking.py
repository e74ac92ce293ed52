"""The tracking-server launcher against a real MLflow server on loopback."""

import mlflow

from ehrfm.tracking import ServerSettings, is_healthy


def test_server_logs_and_reads_back_a_run(mlflow_server):
    assert is_healthy(mlflow_server)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment_id = client.create_experiment("tracking-smoke")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "loss", 1.5, step=3)
    client.set_terminated(run.info.run_id)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.value, m.step) for m in history] == [(1.5, 3)]


def test_settings_from_env_and_default_store(monkeypatch, tmp_path):
    monkeypatch.setenv("EHRFM_MLFLOW_PORT", "6123")
    monkeypatch.setenv("EHRFM_MLFLOW_DIR", str(tmp_path))
    settings = ServerSettings.from_env()
    assert settings.url == "http://127.0.0.1:6123"
    command = settings.command()
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert not is_healthy(settings.url, timeout=0.5)
