"""Cluster definitions are valid for the tools that will read them.

- KubeRay RayCluster / RayJob / RayService: JSON Schema validation against the CRDs' openAPIV3Schema
  (tests/data/kuberay, a faithful subset), with unknown fields rejected as `kubectl apply` does;
  the Serve config and runtime envs inside them against Ray's own schemas.
- `ray up` (AWS): Ray's cluster-config schema shipped in the installed ray package, and Ray's own
  prepare + validate steps.
- MLflow on Kubernetes: the Deployment's settings reach `mlflow server` through ehrfm.tracking,
  and a real server started with them accepts the in-cluster host name and refuses others.
- Secrets: the RayService's Serve token and MLflow's basic-auth credentials come from Kubernetes
  Secrets that every container requires, so neither service can start open.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from ehrfm.tracking import ServerSettings
from tests.support.mlflow_manifest import deployment_env, mlflow_objects

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "cluster" / "kuberay"
SCHEMAS = Path(__file__).resolve().parents[1] / "data" / "kuberay"
SCHEMA_FILES = ("raycluster.v1.yaml", "rayjob.v1.yaml", "rayservice.v1.yaml")
MANIFESTS = {"RayCluster": "raycluster.yaml", "RayJob": "rayjob-pretrain.yaml", "RayService": "rayservice.yaml"}
SCHEMA_OF_KIND = {"RayCluster": "raycluster.v1.yaml", "RayJob": "rayjob.v1.yaml", "RayService": "rayservice.v1.yaml"}
IMAGE_WORKDIR = "/home/ray/ehrfm"


def closed(schema):
    """Reject unknown fields: every object that lists properties and says nothing else gets
    `additionalProperties: false` (kubectl's default strict field validation)."""
    if isinstance(schema, dict):
        schema = {key: closed(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def kuberay_validators() -> dict[str, jsonschema.protocols.Validator]:
    schemas = {name: closed(yaml.safe_load((SCHEMAS / name).read_text())) for name in SCHEMA_FILES}
    registry = Registry().with_resources(
        (name, DRAFT202012.create_resource(schema)) for name, schema in schemas.items()
    )
    return {name: jsonschema.Draft202012Validator({"$ref": name}, registry=registry) for name in SCHEMA_FILES}


def load_manifest(kind: str) -> dict:
    return yaml.safe_load((KUBERAY / MANIFESTS[kind]).read_text())


def cluster_spec(manifest: dict) -> dict:
    spec = manifest["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[
        manifest["kind"]
    ]


def errors(validator, document) -> list[str]:
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document))


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_kuberay_manifest_is_valid_against_its_crd(kind, kuberay_validators):
    manifest = load_manifest(kind)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == kind
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])
    assert errors(kuberay_validators[SCHEMA_OF_KIND[kind]], manifest) == []


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda m: m["spec"]["headGroupSpec"].update(rayStartParam={}), "'rayStartParam' was unexpected"),
        (lambda m: m["spec"]["workerGroupSpecs"][0].pop("minReplicas"), "'minReplicas' is a required property"),
        (lambda m: m["spec"]["authOptions"].update(mode="tokens"), "'tokens' is not one of"),
        (lambda m: m["spec"]["workerGroupSpecs"][0].update(maxReplicas="8"), "'8' is not of type 'integer'"),
        (
            lambda m: m["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(imagePullPolcy="Always"),
            "'imagePullPolcy' was unexpected",
        ),
        (
            lambda m: m["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
                "limits"
            ].update(memory="64 GB"),
            "does not match",
        ),
    ],
)
def test_crd_validation_catches_broken_manifests(breakage, expected, kuberay_validators):
    manifest = copy.deepcopy(load_manifest("RayCluster"))
    breakage(manifest)
    found = errors(kuberay_validators["raycluster.v1.yaml"], manifest)
    assert any(expected in message for message in found), found


def test_rayjob_embedded_cluster_is_checked_against_the_raycluster_schema(kuberay_validators):
    manifest = copy.deepcopy(load_manifest("RayJob"))
    manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupNam"] = "gpu"
    assert any("'groupNam' was unexpected" in e for e in errors(kuberay_validators["rayjob.v1.yaml"], manifest))


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_kuberay_clusters_match_this_ray_and_use_token_auth(kind):
    spec = cluster_spec(load_manifest(kind))
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head runs no tasks
    templates = [spec["headGroupSpec"]["template"]] + [group["template"] for group in spec["workerGroupSpecs"]]
    images = {c["image"] for t in templates for c in t["spec"]["containers"]}
    kustomize_images = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())["images"]
    assert images == {f"{kustomize_images[0]['name']}:{kustomize_images[0]['newTag']}"}


def test_kuberay_cluster_has_a_gpu_group_and_shared_storage():
    spec = load_manifest("RayCluster")["spec"]
    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) >= 1
    head_limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    claim = yaml.safe_load((KUBERAY / "storage.yaml").read_text())
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for template in [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups.values()]:
        claims = {
            v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"] if "persistentVolumeClaim" in v
        }
        assert claims == {claim["metadata"]["name"]}


def _runtime_env(text: str) -> dict:
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(text)
    RuntimeEnv(**env)  # Ray's own validation of the fields
    return env


def test_rayjob_runs_pretraining_from_the_image_with_the_runtime_env_convention():
    spec = load_manifest("RayJob")["spec"]
    command = spec["entrypoint"].split()
    assert command[:2] == ["python", "jobs/pretrain.py"] and (REPO / command[1]).is_file()
    env = _runtime_env(spec["runtimeEnvYAML"])
    workdir = re.search(r"^WORKDIR (\S+)$", (REPO / "cluster" / "image" / "Dockerfile").read_text(), re.M).group(1)
    assert workdir == IMAGE_WORKDIR and env["working_dir"] == f"local://{IMAGE_WORKDIR}"
    assert (
        env["env_vars"]["PYTHONPATH"]
        == _runtime_env((REPO / "cluster" / "runtime_env.yaml").read_text())["env_vars"]["PYTHONPATH"]
    )
    assert spec["shutdownAfterJobFinishes"] is True
    config = command[command.index("--config") + 1]
    assert config == "jobs/configs/pretrain-gpu-300m.yaml"
    assert (REPO / config).is_file()


def test_rayservice_serve_config_is_valid_for_ray_serve():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(load_manifest("RayService")["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert app.import_path == "ehrfm.serve.app:build_app"
    assert app.runtime_env["working_dir"] == f"local://{IMAGE_WORKDIR}"
    assert app.args["model_uri"].endswith("@champion")


def test_runtime_env_convention_file():
    env = _runtime_env((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert env["env_vars"] == {"PYTHONPATH": "platform"}
    assert (REPO / env["env_vars"]["PYTHONPATH"] / "ehrfm" / "__init__.py").is_file()
    assert not (REPO / "platform" / "__init__.py").exists()


def test_ray_up_config_is_valid_for_the_cluster_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster" / "aws" / "ehrfm-gpu.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's own path in `ray up`
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)

    assert config["provider"]["type"] == "aws"
    node_types = config["available_node_types"]
    assert node_types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert re.match(r"(g|p)\d", node_types["gpu_worker"]["node_config"]["InstanceType"])  # a GPU family
    assert config["docker"]["image"] == "ehrfm/ehrfm:0.1.0"
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}


def test_mlflow_k8s_objects_fit_together():
    objects = mlflow_objects()
    deployment, service, claim = objects["Deployment"], objects["Service"], objects["PersistentVolumeClaim"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    port_names = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert port_names[service["spec"]["ports"][0]["targetPort"]] == service["spec"]["ports"][0]["port"] == 5000
    assert {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]} == {claim["metadata"]["name"]}
    assert container["command"] == ["python", "-m", "ehrfm.tracking", "serve"]
    tracking_uri = load_manifest("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"][0]
    namespace = yaml.safe_load((REPO / "mlflow" / "k8s" / "kustomization.yaml").read_text())["namespace"]
    assert tracking_uri == {
        "name": "MLFLOW_TRACKING_URI",
        "value": f"http://{service['metadata']['name']}.{namespace}.svc.cluster.local:5000",
    }


def test_mlflow_deployment_settings_reach_the_server_command(monkeypatch):
    deployment = mlflow_objects()["Deployment"]
    for secret in (
        {},
        {
            "backend-store-uri": "postgresql+psycopg2://mlflow@db:5432/mlflow",
            "artifacts-destination": "s3://bucket/mlflow",
            "PGPASSWORD": "x",
        },
    ):
        env = deployment_env(deployment, secret)
        for key in [k for k in os.environ if k.startswith("EHRFM_MLFLOW_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        command = ServerSettings.from_env().command()
        option = {command[i]: command[i + 1] for i in range(4, len(command) - 1, 2)}
        assert option["--host"] == "0.0.0.0" and option["--port"] == "5000" and option["--workers"] == "2"
        assert option["--allowed-hosts"] == env["EHRFM_MLFLOW_ALLOWED_HOSTS"]
        assert option["--backend-store-uri"] == secret.get("backend-store-uri", "sqlite:////mlflow/mlflow.db")
        assert option["--artifacts-destination"] == secret.get("artifacts-destination", "/mlflow/artifacts")
        assert option["--app-name"] == "basic-auth"


def _secret_env(container: dict) -> dict[str, tuple[str, str, bool]]:
    """{variable: (Secret name, key, optional)} of a container's env."""
    return {
        item["name"]: (ref["name"], ref["key"], ref.get("optional", False))
        for item in container.get("env", [])
        if (ref := item.get("valueFrom", {}).get("secretKeyRef"))
    }


def _containers(kind: str) -> list[dict]:
    spec = cluster_spec(load_manifest(kind))
    templates = [spec["headGroupSpec"]["template"]] + [group["template"] for group in spec["workerGroupSpecs"]]
    return [container for template in templates for container in template["spec"]["containers"]]


def test_rayservice_takes_the_serve_token_from_a_required_secret_and_keeps_auth_on():
    from ehrfm.serve.app import config_from_args

    for container in _containers("RayService"):
        assert _secret_env(container)["EHRFM_SERVE_TOKEN"] == ("ehrfm-serve-token", "token", False)
    serve_config = yaml.safe_load(load_manifest("RayService")["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    config = config_from_args(app["args"])
    assert config.auth.enabled and config.auth.token_env == "EHRFM_SERVE_TOKEN"
    assert "EHRFM_SERVE_TOKEN" not in json.dumps(app.get("runtime_env", {}))  # never a token in the Serve config
    comments = (KUBERAY / MANIFESTS["RayService"]).read_text()
    assert "kubectl -n ehrfm create secret generic ehrfm-serve-token" in comments


def test_rayservice_runs_the_haproxy_ingress_as_ehrfm_serve_does():
    from ehrfm.serve.ingress import PORT_VARS, ingress_env

    wanted = {k: v for k, v in ingress_env("haproxy", {}).items() if k not in PORT_VARS}  # Ray's default ports
    for container in _containers("RayService"):
        values = {e["name"]: e.get("value") for e in container["env"]}
        assert {k: values.get(k) for k in wanted} == wanted, container["name"]


def test_mlflow_on_kubernetes_runs_basic_auth_and_every_ray_pod_logs_in():
    container = mlflow_objects()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    values = {item["name"]: item.get("value") for item in container["env"]}
    assert values["EHRFM_MLFLOW_APP_NAME"] == "basic-auth"
    assert {k: v for k, v in _secret_env(container).items() if v[0] == "mlflow-auth"} == {
        "MLFLOW_AUTH_ADMIN_USERNAME": ("mlflow-auth", "username", False),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ("mlflow-auth", "password", False),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": ("mlflow-auth", "flask-secret-key", False),
    }
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"  # basic-auth leaves /health open
    assert "kubectl -n ehrfm create secret generic mlflow-auth" in (REPO / "mlflow" / "k8s" / "mlflow.yaml").read_text()
    for kind in sorted(MANIFESTS):
        for ray_container in _containers(kind):
            secrets = _secret_env(ray_container)
            assert secrets["MLFLOW_TRACKING_USERNAME"] == ("mlflow-auth", "username", False), kind
            assert secrets["MLFLOW_TRACKING_PASSWORD"] == ("mlflow-auth", "password", False), kind
