"""The cluster-level HTTP ingress settings (platform/ehrfm/serve/ingress.py): what a cluster about to start
gets in its environment, an operator's values kept, ports in use replaced."""

from __future__ import annotations

import socket

import pytest

from ehrfm.serve.ingress import (
    BUFFER_DIRECTIVE,
    DRAINING_VAR,
    ENABLE_VAR,
    RETRY_ON,
    current_ingress,
    describe,
    ingress_env,
    use_ingress,
    with_request_buffering,
)


def test_haproxy_gets_replays_and_ray_default_ports_when_they_are_free():
    with socket.socket() as probe:  # find a free port to stand in for the stats default
        probe.bind(("0.0.0.0", 0))
        free = probe.getsockname()[1]
    env = ingress_env("haproxy", {"RAY_SERVE_HAPROXY_STATS_PORT": str(free)})
    assert env[ENABLE_VAR] == "1"
    # Ray writes the value as the `retry-on` line of HAProxy's defaults; its second line makes HAProxy hold
    # each request whole, which a replay needs
    conditions, directive = env["RAY_SERVE_HAPROXY_RETRY_ON"].split("\n")
    assert conditions == RETRY_ON and "empty-response" in RETRY_ON.split()
    assert directive == "    option http-buffer-request" == f"    {BUFFER_DIRECTIVE}"
    assert env["RAY_SERVE_HAPROXY_RETRIES"] == "10"
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == str(free)


def test_a_port_in_use_is_replaced_and_an_operators_retry_policy_is_kept():
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        env = ingress_env(
            "haproxy",
            {"RAY_SERVE_HAPROXY_METRICS_PORT": str(taken), "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure"},
        )
    assert env["RAY_SERVE_HAPROXY_METRICS_PORT"] != str(taken)
    assert int(env["RAY_SERVE_HAPROXY_METRICS_PORT"]) > 0
    assert env["RAY_SERVE_HAPROXY_RETRY_ON"] == f"conn-failure\n    {BUFFER_DIRECTIVE}"  # conditions kept
    assert with_request_buffering(env["RAY_SERVE_HAPROXY_RETRY_ON"]) == env["RAY_SERVE_HAPROXY_RETRY_ON"]  # once


def test_the_environment_decides_when_no_mode_is_given_and_the_default_is_haproxy():
    environ: dict[str, str] = {}
    assert current_ingress(environ) == "haproxy"
    assert use_ingress(None, environ)[ENABLE_VAR] == "1" and environ[ENABLE_VAR] == "1"
    assert environ[DRAINING_VAR] == "2"  # a local cluster: HAProxy drops a stopping replica at once
    assert DRAINING_VAR not in ingress_env("haproxy", {})  # a multi-node cluster keeps Ray's 30 s
    environ = {ENABLE_VAR: "0"}
    assert use_ingress(None, environ) == {ENABLE_VAR: "0"}
    assert describe(environ) == "ingress: Serve's Python proxy"
    assert use_ingress("haproxy", environ)[ENABLE_VAR] == "1" and current_ingress(environ) == "haproxy"
    assert "HAProxy" in describe(environ)
    with pytest.raises(ValueError, match="unknown ingress"):
        ingress_env("nginx", {})  # type: ignore[arg-type]


def test_haproxy_clusters_get_whole_responses_unless_an_operator_chose_a_callback():
    from ehrfm.serve.whole_response import CALLBACK_PATH, CALLBACK_VAR

    env = ingress_env("haproxy", {})
    assert env[CALLBACK_VAR] == CALLBACK_PATH == "ehrfm.serve.whole_response:middlewares"
    assert "replicas send each response whole" in describe(env)
    for own in ("mycompany.serve:middlewares", ""):  # their own callback, or deliberately none
        kept = ingress_env("haproxy", {CALLBACK_VAR: own})
        assert kept[CALLBACK_VAR] == own and "each response whole" not in describe(kept)
    assert CALLBACK_VAR not in ingress_env("proxy", {})  # the Python proxy answers the client itself
