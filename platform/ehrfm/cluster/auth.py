"""Ray token authentication for the clusters this project starts, and for their clients.

With `RAY_AUTH_MODE=token` (Ray 2.60) every Ray process and every client (`ray job submit`, the
dashboard's HTTP API, `ray.init`) must present the cluster's token. Ray reads the token from
`RAY_AUTH_TOKEN`, else from the file named by `RAY_AUTH_TOKEN_PATH`, else from ~/.ray/auth_token.
We always use a token *file* named by `RAY_AUTH_TOKEN_PATH`: the user's ~/.ray/auth_token is never
read or overwritten, and the token never shows in a process list or an environment dump.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

AUTH_MODE_VAR = "RAY_AUTH_MODE"
TOKEN_PATH_VAR = "RAY_AUTH_TOKEN_PATH"
TOKEN_VAR = "RAY_AUTH_TOKEN"


def ensure_token_file(path: Path) -> Path:
    """A random 256-bit token at `path` (mode 0600), created unless a non-empty one is there."""
    if path.is_file() and path.read_text(encoding="utf-8").strip():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(secrets.token_hex(32))
    return path


def token_env(token_path: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with token auth on and the token file named."""
    env = dict(os.environ if base is None else base)
    env[AUTH_MODE_VAR] = "token"
    env[TOKEN_PATH_VAR] = str(token_path)
    env.pop(TOKEN_VAR, None)  # Ray would prefer it over the file
    return env


def bearer_header(token_path: Path) -> dict[str, str]:
    """The HTTP header the dashboard API (and the job-submission API behind it) expects."""
    return {"Authorization": f"Bearer {token_path.read_text(encoding='utf-8').strip()}"}
