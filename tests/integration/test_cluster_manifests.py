"""MLflow on Kubernetes: a real server started with the Deployment's settings (basic auth, the admin from the
`mlflow-auth` Secret) refuses requests without a login and accepts the in-cluster host name only (the manifests
themselves: tests/unit/test_cluster_manifests.py)."""

from __future__ import annotations

import base64
import urllib.error
import urllib.request
from pathlib import Path

from ehrfm.cluster.local import free_port
from ehrfm.tracking import ServerSettings, start_server
from tests.support.mlflow_manifest import deployment_env, mlflow_objects

REPO = Path(__file__).resolve().parents[2]


AUTH_SECRET = {"username": "ehrfm", "password": "pw-for-the-test-0123", "flask-secret-key": "k" * 64}
LOGIN = (AUTH_SECRET["username"], AUTH_SECRET["password"])


def _status_for_host(url: str, host: str, login: tuple[str, str] | None = LOGIN) -> int:
    headers = {"Host": host}
    if login is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(login).encode()).decode()
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_mlflow_server_requires_a_login_and_accepts_the_in_cluster_host_name_only(tmp_path, monkeypatch):
    env = deployment_env(mlflow_objects()["Deployment"], AUTH_SECRET)
    for key in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        monkeypatch.setenv(key, env[key])  # what the Secret gives the container
    settings = ServerSettings(
        state_dir=tmp_path,
        port=free_port(),
        allowed_hosts=env["EHRFM_MLFLOW_ALLOWED_HOSTS"],
        app_name=env["EHRFM_MLFLOW_APP_NAME"],
    )
    server = start_server(settings)  # ready once /health answers: the probes need no login
    try:
        assert _status_for_host(settings.url, "mlflow.ehrfm.svc.cluster.local:5000") == 200
        assert _status_for_host(settings.url, "mlflow:5000") == 200
        assert _status_for_host(settings.url, "attacker.example:5000") == 403
        assert _status_for_host(settings.url, "mlflow:5000", login=None) == 401
        assert _status_for_host(settings.url, "mlflow:5000", login=(LOGIN[0], "wrong")) == 401
    finally:
        server.terminate()
        server.wait(timeout=60)
