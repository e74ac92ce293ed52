"""What tests/{integration,e2e}/test_serve.py share: the service's two applications on the session's Ray cluster
(`ehrfm`: route /, 2 RiskModel replicas, small limits; `secure`: route /secure, 1 replica, polling the alias
every second; both with the default bearer auth, the token in a 0600 file as `ehrfm serve` writes it) in front
of a model registered in the loopback MLflow server, and the persons and requests they are asked about.
`post` sends the token unless told `token=None`.

Each test module registers its own model (its TASK), so that registry versions do not depend on other modules;
the fixtures stay in the test modules and call these."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
import requests

from ehrfm.cluster.local import free_port
from ehrfm.mlops.registry import log_risk_model, register_if_better
from ehrfm.serve.app import build_app
from tests.support.risk_model_factory import PGS_IDS, make_person, person_record, write_risk_model, write_tokenizer

TOKEN = "s3cret-test-token-0123456789"
MAX_EVENTS, MAX_PERSONS, MAX_BODY = 60, 4, 32 * 1024


def write_token_file(path: Path, token: str = TOKEN) -> Path:
    """`token` in a new file readable by its owner only (the service refuses any other mode)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return path


@functools.cache
def token_file() -> Path:
    """One token file per test process, so every app built from serve_app_args (redeploys too) has it."""
    return write_token_file(Path(tempfile.mkdtemp(prefix="ehrfm-serve-token-")) / "token")


@contextlib.contextmanager
def serve_tracking(mlflow_server: str) -> Iterator[str]:
    """The module logs and registers on the session's loopback server (previous URI restored)."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("serve-tests")
    try:
        yield mlflow_server
    finally:
        mlflow.set_tracking_uri(previous)


def write_model_dirs(root: Path, task: str) -> dict[int, Path]:
    tokenizer = write_tokenizer(root / "tokenizer.json")
    return {v: write_risk_model(root / f"v{v}", tokenizer, seed=v, task=task) for v in (1, 2)}


def register_version_one(model_dirs: dict[int, Path], task: str) -> dict:
    uri = log_risk_model(model_dirs[1], task, {"val_auroc": 0.61}, "# test model 1\n")
    registered = register_if_better(uri, task, 0.61)
    assert registered["version"] == 1 and registered["promoted"]
    return registered


def serve_app_args(model: str, tracking_uri: str, **extra) -> dict:
    return {
        "model_uri": f"models:/{model}@champion",
        "tracking_uri": tracking_uri,
        "limits": {"max_events": MAX_EVENTS, "max_persons": MAX_PERSONS, "max_body_bytes": MAX_BODY},
        # requests wait up to 20 ms for batch-mates, so a replica under load always holds some
        "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.02},
        "model_deployment": {"num_replicas": 2, "num_cpus": 0.2, "health_check_period_s": 2.0},
        "ingress_deployment": {"num_cpus": 0.2},
        "explain_deployment": {"num_cpus": 0.1},
        "auth": {"token_file": str(token_file())},
        **extra,
    }


@contextlib.contextmanager
def running_service(model: str, tracking: str, secret_dir: Path, **ehrfm_args) -> Iterator[dict]:
    """Both applications served on a free loopback port (`ehrfm_args` override the `ehrfm` app's
    settings, e.g. its topology); Serve shut down afterwards."""
    from ray import serve

    secret = write_token_file(secret_dir / "token")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app(serve_app_args(model, tracking, model_version="1", **ehrfm_args)), name="ehrfm", route_prefix="/"
    )
    serve.run(
        build_app(
            serve_app_args(
                model,
                tracking,
                alias_poll_s=1.0,
                auth={"token_file": str(secret)},
                model_deployment={"num_replicas": 1, "num_cpus": 0.2},
            )
        ),
        name="secure",
        route_prefix="/secure",
    )
    yield {"url": f"http://127.0.0.1:{port}", "tracking": tracking}
    serve.shutdown()


def post(url: str, body, token: str | None = TOKEN, **kwargs) -> requests.Response:
    """POST a JSON body (or raw bytes/text) with the bearer token unless `token` is None."""
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(
        url,
        data=body if isinstance(body, (bytes, str)) else json.dumps(body),
        headers={"Content-Type": "application/json", **auth, **kwargs.pop("headers", {})},
        timeout=60,
        **kwargs,
    )


FULL_PRS = {k: 0.9 - 0.6 * i for i, k in enumerate(PGS_IDS)}


def persons_and_requests():
    """A genotyped person with an unknown code, one without PRS, one with a partial PRS vector."""
    people = [
        make_person(31, seed=11, n_visits=8, prs=FULL_PRS, unknown_code=True),
        make_person(32, seed=12, n_visits=5, sex=8507),
        make_person(33, seed=13, n_visits=6, prs={PGS_IDS[0]: 1.4, PGS_IDS[3]: -0.3}),
    ]
    times = [dt.datetime.combine(p.visits[-2][1], dt.time(15)) for p in people]
    return people, times, [person_record(p, t) for p, t in zip(people, times)]
