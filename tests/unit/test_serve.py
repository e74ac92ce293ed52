"""The scoring service's configuration without serving: the Serve config file and RayService args are valid
for Serve and build a config; the bearer token comes from the environment or a secret file (the service
over real HTTP: tests/integration, tests/e2e)."""

from __future__ import annotations

import pytest

MAX_EVENTS, MAX_PERSONS, MAX_BODY = 60, 4, 32 * 1024
MARKER_CODE, MARKER_BIRTH = "CONDITION/987650321", "1931-03-17"  # must never reach a log


# ---- configuration (no Ray) -------------------------------------------------------------------------
def test_serve_config_file_and_rayservice_args_are_valid_for_serve_and_build_a_config(repo_root, tmp_path):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from ehrfm.serve.app import config_from_args

    schema = ServeDeploySchema.model_validate(yaml.safe_load((repo_root / "cluster" / "serve.yaml").read_text()))
    assert schema.http_options.host == "127.0.0.1"
    (app,) = schema.applications
    assert app.import_path == "ehrfm.serve.app:build_app"
    config = config_from_args(app.args)
    assert config.model_uri == "models:/ehrfm-t2d@champion" and config.model_deployment.autoscaling["max_replicas"] == 4
    assert "num_replicas" not in config.model_deployment.deployment_options()
    rayservice = next(
        d
        for d in yaml.safe_load_all((repo_root / "cluster" / "kuberay" / "rayservice.yaml").read_text())
        if d and d.get("kind") == "RayService"
    )
    (service_app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    assert config_from_args(service_app["args"]).model_uri.endswith("@champion")
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(app.args))
    dotted = config_from_args(
        {"config": str(tmp_path / "args.yaml"), "batching.max_batch_size": "1", "model_deployment": {"num_cpus": 0.5}}
    )
    assert dotted.batching.max_batch_size == 1 and dotted.model_deployment.num_cpus == 0.5
    assert dotted.model_deployment.autoscaling["min_replicas"] == 1  # nested dicts merge, not replace
    with pytest.raises(ValueError, match="batch_size"):
        config_from_args({"model_uri": "models:/m@a", "batching": {"batch_size": 4}})
    with pytest.raises(ValueError, match="max_replica"):
        config_from_args({"model_uri": "models:/m@a", "model_deployment": {"autoscaling": {"max_replica": 3}}})


def test_bearer_token_comes_from_the_environment_or_a_secret_file(tmp_path):
    from ehrfm.serve.auth import read_token
    from ehrfm.serve.config import AuthConfig

    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    assert read_token(AuthConfig(), {}) is None
    assert read_token(AuthConfig(), {"EHRFM_SERVE_TOKEN": "from-env"}) == "from-env"
    assert read_token(AuthConfig(), {"EHRFM_SERVE_TOKEN_FILE": str(secret)}) == "from-file"
    assert read_token(AuthConfig(token_file=str(secret)), {}) == "from-file"
    with pytest.raises(RuntimeError, match="auth.required"):
        read_token(AuthConfig(required=True), {})
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        read_token(AuthConfig(token_file=str(tmp_path / "empty")), {})
