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
    assert dotted.model_deployment.autoscaling["min_replicas"] == 2  # nested dicts merge, not replace
    with pytest.raises(ValueError, match="batch_size"):
        config_from_args({"model_uri": "models:/m@a", "batching": {"batch_size": 4}})
    with pytest.raises(ValueError, match="max_replica"):
        config_from_args({"model_uri": "models:/m@a", "model_deployment": {"autoscaling": {"max_replica": 3}}})


def _private(path, text: str):
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_auth_is_on_by_default_and_the_token_comes_from_the_environment_or_a_0600_file(tmp_path):
    from ehrfm.serve.auth import TokenError, read_token
    from ehrfm.serve.config import AuthConfig

    secret = _private(tmp_path / "token", "from-file\n")
    assert AuthConfig().enabled
    with pytest.raises(TokenError, match="bearer auth is on but no token is set: set EHRFM_SERVE_TOKEN"):
        read_token(AuthConfig(), {})
    assert read_token(AuthConfig(enabled=False), {"EHRFM_SERVE_TOKEN": "ignored"}) is None  # the opt-out
    assert read_token(AuthConfig(), {"EHRFM_SERVE_TOKEN": "from-env"}) == "from-env"
    assert (
        read_token(AuthConfig(), {"EHRFM_SERVE_TOKEN": "from-env", "EHRFM_SERVE_TOKEN_FILE": str(secret)}) == "from-env"
    )
    assert read_token(AuthConfig(), {"EHRFM_SERVE_TOKEN_FILE": str(secret)}) == "from-file"
    assert read_token(AuthConfig(token_file=str(secret)), {}) == "from-file"
    with pytest.raises(TokenError, match="empty"):
        read_token(AuthConfig(token_file=str(_private(tmp_path / "empty", "  \n"))), {})
    with pytest.raises(TokenError, match="does not exist"):
        read_token(AuthConfig(token_file=str(tmp_path / "missing")), {})


def test_a_token_file_others_can_read_is_refused_naming_the_file(tmp_path):
    from ehrfm.serve.auth import TokenError, ensure_token, read_token
    from ehrfm.serve.config import AuthConfig

    shared = tmp_path / "token"
    shared.write_text("t0ken-in-a-shared-file\n")
    for mode in (0o640, 0o604, 0o620):
        shared.chmod(mode)
        for call in (read_token, ensure_token):
            with pytest.raises(TokenError) as caught:
                call(AuthConfig(token_file=str(shared)), {})
            message = str(caught.value)
            assert f"bearer token file {shared} is accessible by group or others (mode {mode:04o})" in message
            assert "chmod 600" in message and "t0ken" not in message and "\n" not in message


def test_serve_creates_a_0600_token_file_on_first_start_and_reuses_it(tmp_path, capsys):
    from ehrfm.serve.app import setup_auth
    from ehrfm.serve.auth import TokenError, ensure_token
    from ehrfm.serve.config import AuthConfig, ServeConfig

    env = {"EHRFM_STATE_DIR": str(tmp_path / "state")}
    first = ensure_token(AuthConfig(), env)
    default = tmp_path / "state" / "serve_token"
    assert first.created and first.path == default and len(first.token) >= 40
    assert (default.stat().st_mode & 0o777) == 0o600 and (default.parent.stat().st_mode & 0o777) == 0o700
    again = ensure_token(AuthConfig(), env)
    assert (again.token, again.path, again.created) == (first.token, default, False)
    assert ensure_token(AuthConfig(), {**env, "EHRFM_SERVE_TOKEN": "e"}).path is None  # the variable wins
    named = ensure_token(AuthConfig(), {**env, "EHRFM_SERVE_TOKEN_FILE": str(tmp_path / "named")})
    assert named.created and named.path == tmp_path / "named" and named.token != first.token
    with pytest.raises(TokenError):  # a directory where the file should be is not overwritten or used
        ensure_token(AuthConfig(token_file=str(tmp_path)), {})

    # `ehrfm serve`: says where the file is and how to send it; the token is printed only when created
    # and only on a terminal (pytest's capture is not one), and the replicas get the path, not the token
    config = ServeConfig(model_uri="/m", auth={"token_file": str(tmp_path / "serve" / "token")})
    setup_auth(config)
    created = capsys.readouterr().out
    token = (tmp_path / "serve" / "token").read_text().strip()
    assert config.auth.token_file == str(tmp_path / "serve" / "token")
    assert f"created bearer token file {tmp_path / 'serve' / 'token'} (mode 0600)" in created
    assert f"Authorization: Bearer $(cat {tmp_path / 'serve' / 'token'})" in created and token not in created
    setup_auth(config)
    reused = capsys.readouterr().out
    assert "created" not in reused and f"token in {tmp_path / 'serve' / 'token'}" in reused
    assert (tmp_path / "serve" / "token").read_text().strip() == token
    setup_auth(ServeConfig(model_uri="/m", auth={"enabled": False}))
    assert "bearer auth is DISABLED" in capsys.readouterr().out


def test_build_app_refuses_to_start_with_auth_on_and_no_token(monkeypatch, caplog):
    from ehrfm.serve.app import build_app
    from ehrfm.serve.auth import TokenError, check_auth
    from ehrfm.serve.config import AuthConfig

    for name in ("EHRFM_SERVE_TOKEN", "EHRFM_SERVE_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(TokenError) as caught:
        build_app({"model_uri": "models:/ehrfm-t2d@champion"})
    assert "\n" not in str(caught.value) and "auth.enabled=false" in str(caught.value)
    with caplog.at_level("WARNING", logger="ehrfm.serve.auth"):
        check_auth(AuthConfig(enabled=False), {})
    assert "bearer auth is DISABLED" in caplog.text


def test_serve_command_refuses_a_port_that_already_accepts_connections(tmp_path, monkeypatch, capsys):
    import socket

    from ehrfm.serve.app import main
    from ehrfm.serve.port import foreign_listener

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("EHRFM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("EHRFM_SERVE_TOKEN_FILE", raising=False)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert foreign_listener("0.0.0.0", port, None).startswith(f"0.0.0.0:{port} already accepts connections")
        assert main(["--model-dir", str(tmp_path), "--port", str(port)]) == 2  # before Ray starts
    assert capsys.readouterr().err == (
        f"ehrfm serve: 127.0.0.1:{port} already accepts connections and is not this Ray cluster's Serve "
        "proxy; stop what listens there or choose another --port\n"
    )
    assert not (tmp_path / "state").exists()  # refused before a token file was made
    assert foreign_listener("127.0.0.1", port, None) is None  # closed: free again
