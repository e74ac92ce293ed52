"""Where the API's bearer token comes from: an environment variable, else a secret file (the
Kubernetes way: a mounted Secret). The token never goes into a config, a log or a URL."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ehrfm.serve.config import AuthConfig


def read_token(auth: AuthConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The configured token, or None when auth is off; refuses an empty token file and, with
    `required`, a missing token."""
    env = os.environ if environ is None else environ
    token = env.get(auth.token_env, "").strip() or None
    path = auth.token_file or env.get(auth.token_file_env) or None
    if token is None and path:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"bearer token file {file} does not exist")
        token = file.read_text(encoding="utf-8").strip() or None
        if token is None:
            raise ValueError(f"bearer token file {file} is empty")
    if token is None and auth.required:
        raise RuntimeError(f"auth.required is set but neither {auth.token_env} nor a token file gives a token")
    return token
