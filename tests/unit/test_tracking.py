"""The tracking-server launcher's settings (environment, default store), without starting a server."""

from ehrfm.tracking import ServerSettings, is_healthy


def test_settings_from_env_and_default_store(monkeypatch, tmp_path):
    monkeypatch.setenv("EHRFM_MLFLOW_PORT", "6123")
    monkeypatch.setenv("EHRFM_MLFLOW_DIR", str(tmp_path))
    monkeypatch.delenv("EHRFM_MLFLOW_APP_NAME", raising=False)
    settings = ServerSettings.from_env()
    assert settings.url == "http://127.0.0.1:6123"
    command = settings.command()
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert "--app-name" not in command  # the loopback server has no users; basic auth is for shared ones
    monkeypatch.setenv("EHRFM_MLFLOW_APP_NAME", "basic-auth")
    assert ServerSettings.from_env().command()[-2:] == ["--app-name", "basic-auth"]
    assert not is_healthy(settings.url, timeout=0.5)
