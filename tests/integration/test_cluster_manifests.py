"""MLflow on Kubernetes: a real server started with the Deployment's settings accepts the in-cluster host
name and refuses others (the manifests themselves: tests/unit/test_cluster_manifests.py)."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from ehrfm.cluster.local import free_port
from ehrfm.tracking import ServerSettings, start_server
from tests.support.mlflow_manifest import deployment_env, mlflow_objects

REPO = Path(__file__).resolve().parents[2]


def _status_for_host(url: str, host: str) -> int:
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_mlflow_server_accepts_the_in_cluster_host_name_only(tmp_path):
    env = deployment_env(mlflow_objects()["Deployment"], {})
    settings = ServerSettings(state_dir=tmp_path, port=free_port(), allowed_hosts=env["EHRFM_MLFLOW_ALLOWED_HOSTS"])
    server = start_server(settings)
    try:
        assert _status_for_host(settings.url, "mlflow.ehrfm.svc.cluster.local:5000") == 200
        assert _status_for_host(settings.url, "mlflow:5000") == 200
        assert _status_for_host(settings.url, "attacker.example:5000") == 403
    finally:
        server.terminate()
        server.wait(timeout=60)
