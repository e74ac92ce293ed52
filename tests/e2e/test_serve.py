"""The scoring service under load, over real HTTP (tests/support/serve_app.py): a killed model replica and a
version switch fail no request; `ehrfm serve` deploys the champion in its own process and cluster, its HAProxy
replays the requests a killed model replica held, and it drains on SIGTERM."""

from __future__ import annotations

import contextlib
import math
import re
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from ehrfm.cluster.local import free_port
from ehrfm.mlops.registry import log_risk_model, register_if_better
from ehrfm.serve.app import build_app
from tests.support.serve_app import (
    TOKEN,
    persons_and_requests,
    post,
    register_version_one,
    running_service,
    serve_app_args,
    serve_tracking,
    write_model_dirs,
)

pytestmark = [pytest.mark.mlflow, pytest.mark.ray]

TASK = "servetest-e2e"  # its own registered model, so versions do not depend on other test files
MODEL = f"ehrfm-{TASK}"


@pytest.fixture(scope="module")
def tracking(mlflow_server):
    """This module logs and registers on the session's loopback server (previous URI restored)."""
    with serve_tracking(mlflow_server) as uri:
        yield uri


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return write_model_dirs(tmp_path_factory.mktemp("serve-models"), TASK)


@pytest.fixture(scope="module")
def version_one(tracking, model_dirs):
    return register_version_one(model_dirs, TASK)


TOPOLOGY = "two_hop"  # its ingress retries a call whose model replica died


def app_args(tracking_uri: str, **extra) -> dict:
    return serve_app_args(MODEL, tracking_uri, topology=TOPOLOGY, **extra)


@pytest.fixture(scope="module")
def service(ray_cluster, tracking, version_one, tmp_path_factory):
    """The two_hop topology on the session's cluster, which runs Serve's Python proxy (tests/conftest.py): a
    dying one_hop replica there takes the requests it holds with it, so zero failures is asserted here for
    two_hop, which retries on another model replica. The default deployment (`ehrfm serve`: HAProxy in front
    of one_hop) is killed under load in its own cluster below."""
    with running_service(MODEL, tracking, tmp_path_factory.mktemp("secret"), topology=TOPOLOGY) as running:
        yield running


# ---- load: a killed replica and a version switch lose no request ------------------------------------
class Load:
    """Client threads scoring one person in a loop (no client retries); records every outcome."""

    def __init__(self, url: str, body: dict, threads: int = 3, token: str = TOKEN):
        self.url, self.body, self.token = url, body, token
        self.outcomes: list[tuple[float, int, str | None, float | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.token}"  # auth is on by default
        while not self._stop.is_set():
            try:
                response = session.post(f"{self.url}/v1/score", json=self.body, timeout=120)
                ok = response.status_code == 200
                self.outcomes.append(
                    (
                        time.monotonic(),
                        response.status_code,
                        response.json()["model_version"] if ok else response.text[:200],
                        response.json()["risk"] if ok else None,
                    )
                )
            except requests.RequestException as exc:
                self.outcomes.append((time.monotonic(), -1, f"{type(exc).__name__}: {exc}"[:300], None))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=150)

    def wait_for(self, n: int, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.outcomes) < n and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(self.outcomes) >= n, f"only {len(self.outcomes)} requests in {timeout_s}s"

    def failures(self) -> list:
        return [o for o in self.outcomes if o[1] != 200]


def replica_actors(app: str, deployment: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


@pytest.mark.e2e
def test_killing_a_model_replica_under_load_loses_no_request(service, ray_cluster):
    body = persons_and_requests()[2][0]
    replicas = replica_actors("ehrfm", "RiskModel")
    assert len(replicas) == 2
    with Load(service["url"], body, threads=6) as load:
        load.wait_for(30)
        ray_cluster.kill(ray_cluster.get_actor(replicas[0], namespace="serve"), no_restart=True)
        killed_at = len(load.outcomes)
        load.wait_for(killed_at + 60)
    assert load.failures() == []
    # requests that were on the killed replica were retried by the ingress, not lost or failed
    serve_logs = Path(ray_cluster._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    retried = [
        line
        for path in serve_logs.glob("replica_ehrfm_ScoringAPI_*.log")
        for line in path.read_text(errors="replace").splitlines()
        if "RiskModel replica lost" in line
    ]
    # a kill between requests needs no retry; any retry that happened was for a lost replica
    assert all("ActorDiedError" in line or "Unavailable" in line for line in retried)
    risks = [o[3] for o in load.outcomes]
    assert max(risks) - min(risks) < 1e-6  # one person, one model: one risk (float32 batch rounding aside)
    deadline = time.monotonic() + 120
    while replicas[0] in replica_actors("ehrfm", "RiskModel") or len(replica_actors("ehrfm", "RiskModel")) < 2:
        assert time.monotonic() < deadline, "Serve did not replace the killed replica"
        time.sleep(1.0)


@contextlib.contextmanager
def datagram_lines() -> Iterator[tuple[str, list[str]]]:
    """A loopback UDP socket (`host:port`) whose datagrams are collected as lines while the block runs."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(0.2)
    lines: list[str] = []
    done = threading.Event()

    def receive() -> None:
        while not done.is_set():
            try:
                lines.append(sink.recv(65535).decode(errors="replace"))
            except TimeoutError:
                continue

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    try:
        yield f"127.0.0.1:{sink.getsockname()[1]}", lines
    finally:
        done.set()
        receiver.join(timeout=5)
        sink.close()


def _haproxy_defaults(root_pid: int) -> str:
    """The `defaults` section of the config of the HAProxy running under process `root_pid`."""
    import psutil

    haproxy = [p for p in psutil.Process(root_pid).children(recursive=True) if p.name() == "haproxy"][-1]  # the newest
    args = haproxy.cmdline()
    text = Path(args[args.index("-f") + 1]).read_text()
    return text.split("\ndefaults\n", 1)[1].split("\nfrontend ", 1)[0]


def _model_replicas(root_pid: int) -> list:
    """The processes of the `ehrfm` app's RiskModel replicas under process `root_pid`."""
    import psutil

    replicas = []
    for process in psutil.Process(root_pid).children(recursive=True):
        try:
            if "ServeReplica:ehrfm:RiskModel" in " ".join(process.cmdline()):
                replicas.append(process)
        except psutil.NoSuchProcess:  # exited while listed
            continue
    return replicas


def _serve_replica_logs(root_pid: int) -> list[Path]:
    """The Serve logs of every RiskModel replica the cluster under `root_pid` has run (its session's logs/serve)."""
    for replica in _model_replicas(root_pid):
        for opened in replica.open_files():
            if "/logs/" in opened.path:
                serve_logs = Path(opened.path.split("/logs/")[0]) / "logs" / "serve"
                return sorted(serve_logs.glob("replica_ehrfm_RiskModel_*.log"))
    return []


@pytest.mark.e2e
def test_the_default_service_replays_the_requests_a_killed_model_replica_held(
    tracking, version_one, repo_root, tmp_path, serve_token_file
):
    """`ehrfm serve` with its deployment defaults (its own cluster, HAProxy in front of one_hop, 2 model
    replicas) while 6 clients without retries score: a model replica's process is SIGKILLed twice while it
    holds requests (each waits up to 1 s in the batch queue, so about 3 are in every replica at any time).
    No request fails: HAProxy's own log shows them sent again, to the other replica. Without `option
    http-buffer-request` in HAProxy's defaults (serve/ingress.py) every request held by a killed replica was
    lost. A replica that dies while writing a response resets the connection before any byte of it leaves
    (serve/whole_response.py, tested on its own in tests/integration/test_serve_whole_response.py), so that
    request is replayed too; here the replicas must say the middleware is active (docs/OPERATIONS.md "Failures")."""
    import os
    import signal
    import subprocess

    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    env.pop("RAY_ADDRESS", None)
    port, stdout, stderr = free_port(), tmp_path / "stdout", tmp_path / "stderr"
    arguments = ["--model", MODEL, "--alias", "champion", "--port", str(port), "batching.batch_wait_timeout_s=1"]
    arguments += ["model_deployment.num_cpus=0.2", "ingress_deployment.num_cpus=0.2"]
    killed: list[int] = []
    with datagram_lines() as (log_target, log_lines):
        env["RAY_SERVE_HAPROXY_LOG_TARGET"] = log_target  # HAProxy's access log, one line per datagram
        with stdout.open("w") as out, stderr.open("w") as err:
            command = subprocess.Popen(
                [sys.executable, "jobs/serve.py", *arguments], cwd=repo_root, env=env, stdout=out, stderr=err, text=True
            )
        try:
            deadline = time.monotonic() + 300
            while "serving; " not in stdout.read_text():
                assert command.poll() is None and time.monotonic() < deadline, stdout.read_text() + stderr.read_text()
                time.sleep(0.5)
            assert "ingress: HAProxy (reads each request whole" in stdout.read_text()
            assert "replicas send each response whole" in stdout.read_text()
            assert "    option http-buffer-request\n" in _haproxy_defaults(command.pid)  # what makes a replay possible
            body = persons_and_requests()[2][0]
            with Load(f"http://127.0.0.1:{port}", body, threads=6, token=serve_token_file.read_text().strip()) as load:
                load.wait_for(12)
                for _ in range(2):
                    replicas = _model_replicas(command.pid)
                    assert len(replicas) == 2
                    os.kill(replicas[0].pid, signal.SIGKILL)  # as the OOM killer would: no drain, no goodbye
                    killed.append(replicas[0].pid)
                    load.wait_for(len(load.outcomes) + 12)
                    deadline = time.monotonic() + 120
                    while len(alive := {p.pid for p in _model_replicas(command.pid)}) < 2 or killed[-1] in alive:
                        assert time.monotonic() < deadline, "Serve did not replace the killed replica"
                        time.sleep(0.5)
                    load.wait_for(len(load.outcomes) + 6)
            replica_logs = _serve_replica_logs(command.pid)
            command.send_signal(signal.SIGTERM)
            assert command.wait(timeout=90) == 0, stdout.read_text()[-2000:] + stderr.read_text()[-3000:]
        finally:
            if command.poll() is None:
                command.kill()
                command.wait()
    assert len(killed) == 2 and load.failures() == [], load.failures()[:5]
    # the model replicas sent their responses whole (serve/whole_response.py; a replica says so at its first request)
    said = [log.read_text() for log in replica_logs]
    assert sum("whole-response middleware active" in text for text in said) >= 2, [log.name for log in replica_logs]
    assert not any("whole-response middleware inactive" in text for text in said)
    # HAProxy's httplog: ".../<retries> <queues> "POST ...": "+1" = sent again, to another server
    replayed = [line for line in log_lines if re.search(r"/\+\d+ \d+/\d+ \"POST /v1/score", line)]
    assert len(replayed) >= 2, f"{len(replayed)} replays in {len(log_lines)} HAProxy log lines"


@pytest.mark.e2e
def test_replicas_killed_while_writing_responses_cut_none_of_them(repo_root):
    """The window one_hop used to lose (docs/OPERATIONS.md "Failures"), made wide: two replicas behind the
    default HAProxy ingress (its own cluster, the environment `ehrfm serve` gives it) answer after a 100-ms
    gap between headers and body, so every kill finds responses half written; 6 clients without retries.
    Without serve/whole_response.py each kill cut about 3 responses after their headers (measured: 28 in
    10 kills); with it the dying replica resets those connections before any byte leaves and HAProxy
    replays them on the other replica."""
    import json
    import os
    import subprocess

    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    with datagram_lines() as (log_target, log_lines):
        env["RAY_SERVE_HAPROXY_LOG_TARGET"] = log_target
        done = subprocess.run(
            [sys.executable, "tests/support/midwrite_kill.py", "--kills", "3", "--gap", "0.1"],
            cwd=repo_root,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (result_line,) = [line for line in done.stdout.splitlines() if line.startswith('{"kills"')]  # Ray prints too
    result = json.loads(result_line)
    assert result["kills"] == 3
    outcomes = result["outcomes"]
    assert set(outcomes) == {"ok"}, outcomes  # no cut response, no error
    assert outcomes["ok"] >= 300, outcomes  # it ran under load
    replayed = [line for line in log_lines if re.search(r"/\+\d+ \d+/\d+ \"POST /x", line)]
    assert len(replayed) >= 3, f"{len(replayed)} replays in {len(log_lines)} HAProxy log lines"


@pytest.mark.e2e
def test_version_switch_under_load_fails_no_request_and_reports_the_new_version(service, model_dirs):
    body = persons_and_requests()[2][1]
    expected = {}
    with Load(service["url"], body) as load:
        load.wait_for(20)
        uri = log_risk_model(model_dirs[2], TASK, {"val_auroc": 0.7}, "# test model 2\n")
        moved = register_if_better(uri, TASK, 0.7)
        assert moved["version"] == 2 and moved["promoted"] and moved["previous_champion_version"] == 1
        from ray import serve

        # the redeploy `ehrfm serve` does after the alias moved: the pinned version changes
        serve.run(build_app(app_args(service["tracking"], model_version="2")), name="ehrfm", route_prefix="/")
        switched_at = len(load.outcomes)
        load.wait_for(switched_at + 40)
    assert load.failures() == []
    versions = [o[2] for o in load.outcomes]
    assert versions[:20] == ["1"] * 20 and versions[-20:] == ["2"] * 20
    assert set(versions) == {"1", "2"}
    for version in ("1", "2"):
        risks = [o[3] for o in load.outcomes if o[2] == version]
        expected[version] = risks[0]
        assert max(risks) - min(risks) < 1e-6
    assert not math.isclose(expected["1"], expected["2"], rel_tol=1e-3)  # different weights, different risk
    # the alias-polling app switched by itself, without a redeploy
    headers = {"Authorization": f"Bearer {TOKEN}"}
    deadline = time.monotonic() + 120
    while True:
        response = post(f"{service['url']}/secure/v1/score", body, headers=headers).json()
        if response["model_version"] == "2" or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert response["model_version"] == "2" and response["risk"] == pytest.approx(expected["2"], rel=1e-5)
    assert Counter(versions)["2"] >= 20


@pytest.mark.e2e
def test_serve_command_deploys_the_champion_and_scores_made_up_persons_over_http(
    service, repo_root, tmp_path, serve_token_file
):
    """`ehrfm serve` in its own process and Ray cluster deploys the champion, which scores made-up persons over
    HTTP as the registered model does; SIGTERM then drains: requests in flight (waiting 3 s in the model's batch
    queue for batch-mates) all get their 200 after the signal, and the command exits 0, saying it drained."""
    import os
    import signal
    import subprocess

    from mlflow import MlflowClient

    from ehrfm.serve import model_store
    from ehrfm.serve.smoke import synthetic_persons
    from ehrfm.transfer.predictor import PersonRecord

    champion = MlflowClient().get_model_version_by_alias(MODEL, "champion").version
    env = {**os.environ, "MLFLOW_TRACKING_URI": service["tracking"], "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    env.pop("RAY_ADDRESS", None)
    port, stdout, stderr = free_port(), tmp_path / "stdout", tmp_path / "stderr"
    with stdout.open("w") as out, stderr.open("w") as err:
        command = subprocess.Popen(
            [
                sys.executable,
                "jobs/serve.py",
                "--model",
                MODEL,
                "--alias",
                "champion",
                "--port",
                str(port),
                "model_deployment.num_cpus=0.2",
                "ingress_deployment.num_cpus=0.2",
                "batching.batch_wait_timeout_s=3",  # each request waits 3 s for batch-mates: in flight that long
            ],
            cwd=repo_root,
            env=env,
            stdout=out,
            stderr=err,
            text=True,
        )
    try:
        # what `--smoke 3` checks against, prepared while the command starts: the registered model's own predictions
        local = model_store.load(model_store.resolve(f"models:/{MODEL}@champion", champion), 0.5)
        persons = synthetic_persons(local.predictor.tokenizer, local.predictor.spec.pgs_ids, 3, seed=7)
        expected = local.predictor.predict([PersonRecord.model_validate(p) for p in persons])
        deadline = time.monotonic() + 300
        while "serving; " not in stdout.read_text():
            assert command.poll() is None and time.monotonic() < deadline, stdout.read_text() + stderr.read_text()
            time.sleep(0.5)

        token, outcomes = serve_token_file.read_text().strip(), {}

        def score(i: int) -> None:
            try:
                response = post(f"http://127.0.0.1:{port}/v1/score", persons[i], token=token)
                outcomes[i] = (response.status_code, response.json(), time.monotonic())
            except (requests.RequestException, ValueError) as exc:
                outcomes[i] = (-1, repr(exc), time.monotonic())

        clients = [threading.Thread(target=score, args=(i,)) for i in range(len(persons))]
        for client in clients:
            client.start()
        time.sleep(1.0)  # the requests are in the replicas' batch queue, 2 s from being scored
        signalled = time.monotonic()
        command.send_signal(signal.SIGTERM)
        returncode = command.wait(timeout=90)
        exited_after = time.monotonic() - signalled
        for client in clients:
            client.join(timeout=60)
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()
    out, err = stdout.read_text(), stderr.read_text()
    assert returncode == 0, out[-2000:] + err[-3000:]
    assert exited_after < 60  # graceful_shutdown_timeout_s (20 s) bounds the drain, then Serve and Ray stop
    assert f"deploying {MODEL} version {champion} (alias champion)" in out
    assert "SIGTERM: drained in" in out
    assert "ingress: HAProxy" in out  # the default ingress of a cluster `ehrfm serve` starts
    # every request in flight at the signal was answered after it, by the champion, as the registered model scores
    assert sorted(outcomes) == [0, 1, 2], outcomes
    for i, want in enumerate(expected):
        status, body, answered = outcomes[i]
        assert status == 200, (status, body, out[-2000:])
        assert answered > signalled
        assert body["model_version"] == champion
        assert math.isclose(body["risk"], want["risk"], rel_tol=1e-5, abs_tol=1e-9)
