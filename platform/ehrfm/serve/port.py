"""Is the HTTP port already taken by something else? Serve's proxy binds with SO_REUSEPORT, so a
second service started on a port that is in use does not fail: it silently takes part of the
traffic (a `make run` smoke test once scored against another cluster's model this way). `ehrfm
serve` therefore refuses a port that already accepts connections, unless what answers there is
this Ray cluster's own Serve proxy (a redeploy)."""

from __future__ import annotations

import json
import socket
import urllib.request

WILDCARD_HOSTS = ("0.0.0.0", "::", "")
ROUTES_PATH = "/-/routes"  # a Serve proxy's route table: {route_prefix: application name}


def connect_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to `host`."""
    return "127.0.0.1" if host in WILDCARD_HOSTS else host


def accepts_connections(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((connect_host(host), port), timeout=timeout_s):
            return True
    except OSError:
        return False


def serve_routes(host: str, port: int, timeout_s: float = 2.0) -> dict[str, str] | None:
    """The route table of a Serve proxy at host:port, or None when what answers is not one."""
    url = f"http://{connect_host(host)}:{port}{ROUTES_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            table = json.loads(response.read())
    except (OSError, ValueError):  # refused, timed out, an HTTP error, not JSON
        return None
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        return None
    return table


def foreign_listener(host: str, port: int, own_apps: set[str] | None) -> str | None:
    """One line refusing host:port, or None when nothing listens there or what listens is this
    cluster's Serve proxy. `own_apps`: the applications of this cluster's running Serve, None when
    Serve is not running on it (then any listener is someone else's)."""
    if not accepts_connections(host, port):
        return None
    if own_apps is not None:
        routes = serve_routes(host, port)
        if routes is not None and set(routes.values()) == own_apps:
            return None
    return (
        f"{host}:{port} already accepts connections and is not this Ray cluster's Serve proxy; "
        "stop what listens there or choose another --port"
    )
