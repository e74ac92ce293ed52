"""The MLflow Kubernetes manifest as the cluster-manifest tests read it (unit and integration)."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def mlflow_objects() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((REPO / "mlflow" / "k8s" / "mlflow.yaml").read_text())}


def deployment_env(deployment: dict, secret: dict[str, str]) -> dict[str, str]:
    """The container's environment as Kubernetes would build it, given the optional Secret's data."""
    env = {}
    for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        elif item["valueFrom"]["secretKeyRef"]["key"] in secret:
            env[item["name"]] = secret[item["valueFrom"]["secretKeyRef"]["key"]]
    return env
