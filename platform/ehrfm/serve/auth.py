"""Where the API's bearer token comes from: an environment variable, else a secret file (the
Kubernetes way: a Secret as an env var or a mounted file). Auth is on unless the config turns it
off; a token file anyone but its owner can read is refused, like ssh refuses a private key. The
token never goes into a config, a log, an error message or a URL; only `ehrfm serve` prints it,
once, when it creates the file."""

from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ehrfm.serve.config import AuthConfig

logger = logging.getLogger(__name__)
STATE_DIR_ENV = "EHRFM_STATE_DIR"  # the same state directory the local MLflow server uses
TOKEN_FILE_NAME = "serve_token"
TOKEN_BYTES = 32  # secrets.token_urlsafe(32): 43 characters, 256 bits


class TokenError(RuntimeError):
    """No usable token while auth is on. The message names the variable or file, never the token."""


@dataclass(frozen=True)
class TokenSource:
    """A token and where it came from (`path` is None when it came from the environment)."""

    token: str
    where: str
    path: Path | None = None
    created: bool = False


def _environ(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def configured_file(auth: AuthConfig, environ: Mapping[str, str] | None = None) -> Path | None:
    """The token file the config or `token_file_env` names, if any (`~` expanded, made absolute:
    replicas run in another working directory)."""
    name = auth.token_file or _environ(environ).get(auth.token_file_env) or None
    return None if name is None else Path(name).expanduser().absolute()


def default_token_file(environ: Mapping[str, str] | None = None) -> Path:
    """Where `ehrfm serve` keeps its token when nothing names a file: $EHRFM_STATE_DIR/serve_token,
    by default ~/.ehrfm/serve_token."""
    state = _environ(environ).get(STATE_DIR_ENV) or str(Path.home() / ".ehrfm")
    return Path(state).expanduser().absolute() / TOKEN_FILE_NAME


def read_token_file(path: Path) -> str:
    """The token in `path`; refuses a missing, empty or group/other-accessible file."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise TokenError(f"bearer token file {path} does not exist") from None
    if not stat.S_ISREG(mode):
        raise TokenError(f"bearer token file {path} is not a regular file")
    if mode & 0o077:
        raise TokenError(
            f"bearer token file {path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"run `chmod 600 {path}`"
        )
    token = path.read_text(encoding="utf-8").strip()
    if not token:
        raise TokenError(f"bearer token file {path} is empty")
    return token


def _no_token(auth: AuthConfig) -> TokenError:
    return TokenError(
        f"bearer auth is on but no token is set: set {auth.token_env}, or {auth.token_file_env} / "
        "auth.token_file to a 0600 file holding one (`ehrfm serve` creates one); auth.enabled=false "
        "serves without auth, deliberately"
    )


def read_token(auth: AuthConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The token the service checks; None only when auth is disabled. Raises TokenError when auth
    is on and neither the variable nor the file gives one."""
    if not auth.enabled:
        return None
    env = _environ(environ)
    token = env.get(auth.token_env, "").strip()
    if token:
        return token
    path = configured_file(auth, env)
    if path is None:
        raise _no_token(auth)
    return read_token_file(path)


def check_auth(auth: AuthConfig, environ: Mapping[str, str] | None = None) -> None:
    """Fail fast (TokenError, one line) when auth is on without a token; warn when it is off."""
    if not auth.enabled:
        logger.warning("bearer auth is DISABLED (auth.enabled=false): anyone who reaches the port can score")
        return
    read_token(auth, environ)


def _create_token_file(path: Path) -> str | None:
    """Write a new random token to `path` (created 0600, never overwritten); None if it appeared meanwhile."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None  # another `ehrfm serve` made it first: use theirs
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    return token


def ensure_token(auth: AuthConfig, environ: Mapping[str, str] | None = None) -> TokenSource:
    """`ehrfm serve`'s token: the variable, else the configured file, else the default file; a file
    that does not exist yet is created with a new random token, so the service is never open by
    accident and the next start reuses the same token."""
    env = _environ(environ)
    token = env.get(auth.token_env, "").strip()
    if token:
        return TokenSource(token, f"environment variable {auth.token_env}")
    path = configured_file(auth, env) or default_token_file(env)
    if not path.exists():
        created = _create_token_file(path)
        if created is not None:
            return TokenSource(created, str(path), path, created=True)
    return TokenSource(read_token_file(path), str(path), path)
