"""The MLflow tracking server: start it on loopback, find it, or reuse the one already running.

Jobs find the server through `MLFLOW_TRACKING_URI`. With none set they use the embedded default:
a local server (SQLite backend store + local artifact store under a state directory) that is
started once, detached, and reused by later jobs. On a cluster the server is a shared service
(PostgreSQL + an object store, set through the EHRFM_MLFLOW_* variables below) and
`MLFLOW_TRACKING_URI` points at it; see `mlflow/README.md` and docs/OPERATIONS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 5005
DEFAULT_STATE_DIR = Path(os.environ.get("EHRFM_STATE_DIR", Path.home() / ".ehrfm"))

# MLflow's client retries transient HTTP failures (e.g. a server restart) with these settings;
# the defaults are raised so a job logging through a restart waits instead of failing.
CLIENT_RETRY_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "10",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}

# The server's own job runner (GenAI scorers, trace rollups) starts a pool of consumer processes
# that ehrfm never uses; off unless the environment turns it on.
SERVER_ENV_DEFAULTS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

# The experiment tag MLflow 3's UI reads to pick an experiment's landing page (the value is one of its
# ExperimentKind names): ehrfm's experiments hold training runs, so the runs table, not GenAI traces.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


@dataclass(frozen=True)
class ServerSettings:
    """Where the server listens and stores; every field can come from the environment."""

    state_dir: Path = DEFAULT_STATE_DIR / "mlflow"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    backend_store_uri: str | None = None  # default: sqlite:///<state_dir>/mlflow.db
    artifacts_destination: str | None = None  # default: <state_dir>/artifacts
    workers: int = 1
    allowed_hosts: str | None = None  # Host headers accepted; MLflow's default: localhost + private IPs
    # `basic-auth` on a shared server (mlflow/k8s): users and passwords, the admin from
    # MLFLOW_AUTH_ADMIN_USERNAME/PASSWORD; the loopback default needs none
    app_name: str | None = None

    @classmethod
    def from_env(cls, **overrides) -> ServerSettings:
        env = os.environ
        values = {
            "state_dir": Path(env.get("EHRFM_MLFLOW_DIR", DEFAULT_STATE_DIR / "mlflow")),
            "host": env.get("EHRFM_MLFLOW_HOST", "127.0.0.1"),
            "port": int(env.get("EHRFM_MLFLOW_PORT", DEFAULT_PORT)),
            "backend_store_uri": env.get("EHRFM_MLFLOW_BACKEND_STORE_URI"),
            "artifacts_destination": env.get("EHRFM_MLFLOW_ARTIFACTS_DESTINATION"),
            "workers": int(env.get("EHRFM_MLFLOW_WORKERS", 1)),
            "allowed_hosts": env.get("EHRFM_MLFLOW_ALLOWED_HOSTS"),
            "app_name": env.get("EHRFM_MLFLOW_APP_NAME") or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        backend = self.backend_store_uri or f"sqlite:///{(self.state_dir / 'mlflow.db').resolve()}"
        artifacts = self.artifacts_destination or str((self.state_dir / "artifacts").resolve())
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            artifacts,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]
        if self.allowed_hosts:
            command += ["--allowed-hosts", self.allowed_hosts]
        if self.app_name:
            command += ["--app-name", self.app_name]
        return command


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: `base` (default: ours) with SERVER_ENV_DEFAULTS where unset."""
    env = dict(os.environ if base is None else base)
    for key, value in SERVER_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    return env


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def wait_healthy(url: str, timeout_s: float = 90.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if is_healthy(url):
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"MLflow server exited with code {process.returncode}; see its log")
        time.sleep(0.5)
    raise TimeoutError(f"MLflow server at {url} not healthy after {timeout_s:.0f}s")


def start_server(settings: ServerSettings, detach: bool = False) -> subprocess.Popen:
    """Start `mlflow server` and wait until /health answers. Its log goes to <state_dir>/server.log."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    log = open(settings.state_dir / "server.log", "ab")  # noqa: SIM115 - handed to the child
    process = subprocess.Popen(
        settings.command(),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=detach,
        cwd=settings.state_dir,
        env=server_env(),
    )
    wait_healthy(settings.url, process=process)
    return process


def ensure_tracking_uri(settings: ServerSettings | None = None) -> str:
    """`MLFLOW_TRACKING_URI` if set; else the local server, started (detached) if not running.

    Also sets the client retry environment and exports the URI so Ray workers inherit it.
    """
    for key, value in CLIENT_RETRY_ENV.items():
        os.environ.setdefault(key, value)
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    settings = settings or ServerSettings.from_env()
    if not is_healthy(settings.url):
        start_server(settings, detach=True)
    os.environ["MLFLOW_TRACKING_URI"] = settings.url
    return settings.url


def use_experiment(name: str) -> str:
    """`mlflow.set_experiment(name)` with the experiment-kind tag: MLflow 3 opens an untagged
    experiment on its GenAI traces page; tagged, it opens on the runs table. Returns its id."""
    import mlflow

    experiment = mlflow.set_experiment(name)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


@contextmanager
def mlflow_tracking(uri: str) -> Iterator[None]:
    """The fluent MLflow API (the registry helpers use it) pointed at `uri`, restored afterwards."""
    import mlflow

    previous_uri, previous_env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_uri)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ehrfm tracking", description=__doc__.splitlines()[0])
    parser.add_argument(
        "action",
        choices=["serve", "start", "status"],
        help="serve: run in the foreground; start: detached, reused if running; status",
    )
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--host", default=None)
    parser.add_argument("--state-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    settings = ServerSettings.from_env(port=args.port, host=args.host, state_dir=args.state_dir)
    if args.action == "status":
        healthy = is_healthy(settings.url)
        print(f"{settings.url}: {'healthy' if healthy else 'not running'}")
        return 0 if healthy else 1
    if args.action == "start":
        if is_healthy(settings.url):
            print(f"MLflow already running at {settings.url}")
        else:
            start_server(settings, detach=True)
            print(f"MLflow started at {settings.url} (state in {settings.state_dir})")
        return 0
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(settings.state_dir)
    os.execve(sys.executable, settings.command(), server_env())  # foreground: this process becomes the server
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
