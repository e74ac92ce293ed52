"""A Ray cluster of several nodes on one machine: a head and N workers, token auth on.

Each node is one `ray start --block` process, started in its own process group and recorded in
<state_dir>/cluster.json; `down` stops exactly those processes and their descendants (job drivers
run in sessions of their own). It never runs `ray stop`, which would stop every Ray process on the
machine, other users' and other test sessions' included. The dashboard, and with it the
job-submission API, listens on loopback only; the GCS port is guarded by the token.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ehrfm.cluster.auth import bearer_header, ensure_token_file, token_env
from ehrfm.cluster.processes import NodeProcess, live_process, start_node, stop_nodes
from ehrfm.tracking import DEFAULT_STATE_DIR

STATE_FILE = "cluster.json"
ADDRESS_FILE = "ray_current_cluster"  # Ray writes the GCS address here, under its temp dir
# Ray's Unix sockets live ~66 characters below a node's temp dir (<temp dir>/<node>), and a
# socket path is limited to 107 bytes.
MAX_TEMP_DIR_CHARS = 36
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class LocalClusterSpec:
    """What to start. Ports left at 0 are picked free at start; the dashboard port is fixed."""

    state_dir: Path = DEFAULT_STATE_DIR / "cluster"
    workers: int = 1
    head_cpus: int = 1
    worker_cpus: int = 1
    worker_gpus: int = 0
    port: int = 0
    dashboard_port: int = 8265
    object_store_bytes: int | None = None
    temp_dir: Path | None = None  # Ray's logs and sockets; default <state_dir>/ray
    token_path: Path | None = None  # default <state_dir>/auth_token
    start_timeout_s: float = 120.0

    @property
    def ray_temp_dir(self) -> Path:
        return (self.temp_dir or self.state_dir / "ray").absolute()

    @property
    def token_file(self) -> Path:
        return (self.token_path or self.state_dir / "auth_token").absolute()


@dataclass
class LocalCluster:
    """A started cluster, as recorded in <state_dir>/cluster.json."""

    state_dir: Path
    gcs_address: str
    dashboard_url: str
    token_path: Path
    temp_dir: Path
    nodes: list[NodeProcess] = field(default_factory=list)

    def client_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for `ray job submit` and other clients of this cluster."""
        env = token_env(self.token_path, base)
        env["RAY_API_SERVER_ADDRESS"] = self.dashboard_url
        env.pop("RAY_ADDRESS", None)  # another cluster's (e.g. set by ray.init); the job CLI would fall back to it
        return env

    def save(self) -> None:
        record = asdict(self)
        record.update(state_dir=str(self.state_dir), token_path=str(self.token_path), temp_dir=str(self.temp_dir))
        (self.state_dir / STATE_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, state_dir: Path) -> LocalCluster | None:
        path = state_dir / STATE_FILE
        if not path.is_file():
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            state_dir=Path(record["state_dir"]),
            gcs_address=record["gcs_address"],
            dashboard_url=record["dashboard_url"],
            token_path=Path(record["token_path"]),
            temp_dir=Path(record["temp_dir"]),
            nodes=[NodeProcess(**node) for node in record["nodes"]],
        )

    def head_running(self) -> bool:
        return bool(self.nodes) and live_process(self.nodes[0]) is not None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _port_in_use(port: int) -> bool:
    """True when a server holds the port (a closed one lingering in TIME_WAIT does not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return True
    return False


def _node_env(spec: LocalClusterSpec) -> dict[str, str]:
    env = token_env(spec.token_file)
    # Job entrypoints say `python ...`: make that the interpreter that has Ray and ehrfm.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # `ray start --block` otherwise drains for 30 s on SIGTERM, which only helps Serve upgrades.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    env.pop("RAY_ADDRESS", None)
    return env


def node_temp_dir(spec: LocalClusterSpec, role: str) -> Path:
    """One temp dir per node: nodes sharing one would unpack job working dirs over each other."""
    return spec.ray_temp_dir / ("head" if role == "head" else role.replace("worker-", "w"))


def _common_args(spec: LocalClusterSpec, role: str) -> list[str]:
    args = [
        "--temp-dir",
        str(node_temp_dir(spec, role)),
        "--disable-usage-stats",
        # workers bind OS-chosen ports, so clusters side by side never collide on 10002-19999
        "--min-worker-port",
        "0",
        "--max-worker-port",
        "0",
        "--dashboard-agent-listen-port",
        str(free_port()),
    ]
    if spec.object_store_bytes:
        args += ["--object-store-memory", str(spec.object_store_bytes)]
    return args


def _head_args(spec: LocalClusterSpec) -> list[str]:
    return [
        "--head",
        "--port",
        str(spec.port or free_port()),
        "--dashboard-host",
        LOOPBACK,
        "--dashboard-port",
        str(spec.dashboard_port),
        "--ray-client-server-port",
        str(free_port()),
        "--num-cpus",
        str(spec.head_cpus),
        "--num-gpus",
        "0",
        *_common_args(spec, "head"),
    ]


def _worker_args(spec: LocalClusterSpec, gcs_address: str, role: str) -> list[str]:
    return [
        "--address",
        gcs_address,
        "--num-cpus",
        str(spec.worker_cpus),
        "--num-gpus",
        str(spec.worker_gpus),
        *_common_args(spec, role),
    ]


def _worker_env(base: dict[str, str], index: int, gpus: int) -> dict[str, str]:
    """Each worker node sees only its own GPUs, so two nodes never hand out the same device."""
    env = dict(base)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(index * gpus + i) for i in range(gpus))
    return env


def alive_nodes(dashboard_url: str, token_path: Path, timeout: float = 5.0) -> list[dict]:
    """Alive nodes as the dashboard's state API lists them (authenticated with the token)."""
    request = urllib.request.Request(f"{dashboard_url}/api/v0/nodes?detail=false", headers=bearer_header(token_path))
    with urllib.request.urlopen(request, timeout=timeout) as response:
        payload = json.load(response)
    return [node for node in payload["data"]["result"]["result"] if node["state"] == "ALIVE"]


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_until(check: Callable[[], object], what: str, nodes: list[NodeProcess], timeout_s: float) -> object:
    """Poll `check` until it returns something truthy; fail fast, with the log, if a node died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for node in nodes:
            if live_process(node) is None:
                raise RuntimeError(
                    f"ray node {node.role} exited while waiting for {what}; "
                    f"its log ({node.log}) ends:\n{_log_tail(node.log)}"
                )
        try:
            result = check()
        except (OSError, urllib.error.URLError, KeyError, ValueError):
            result = None
        if result:
            return result
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _node_count_is(cluster: LocalCluster, expected: int) -> Callable[[], bool]:
    return lambda: len(alive_nodes(cluster.dashboard_url, cluster.token_path)) == expected


def _check_spec(spec: LocalClusterSpec) -> None:
    if spec.workers < 0 or spec.head_cpus < 0 or spec.worker_cpus < 1 or spec.worker_gpus < 0:
        raise ValueError(f"invalid cluster sizes: {spec}")
    if len(str(spec.ray_temp_dir)) > MAX_TEMP_DIR_CHARS:
        raise ValueError(
            f"Ray temp dir {spec.ray_temp_dir} is longer than {MAX_TEMP_DIR_CHARS} characters: "
            "Ray's Unix socket paths below it would pass the 107-byte limit. "
            "Pass a shorter --temp-dir (or --state-dir)."
        )
    if _port_in_use(spec.dashboard_port):
        raise RuntimeError(
            f"dashboard port {spec.dashboard_port} is in use (another Ray cluster?); pass --dashboard-port"
        )


def up(spec: LocalClusterSpec) -> LocalCluster:
    """Start the head and the workers and wait until all are alive; reuse a running cluster."""
    state_dir = spec.state_dir.absolute()
    existing = LocalCluster.load(state_dir)
    if existing is not None and existing.head_running():
        return existing
    if existing is not None:
        down(state_dir)  # a dead head: clear what is left of it
    _check_spec(spec)
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    head_temp_dir = node_temp_dir(spec, "head")
    head_temp_dir.mkdir(parents=True, exist_ok=True)
    (head_temp_dir / ADDRESS_FILE).unlink(missing_ok=True)
    env = _node_env(spec)
    ensure_token_file(spec.token_file)
    cluster = LocalCluster(
        state_dir, "", f"http://{LOOPBACK}:{spec.dashboard_port}", spec.token_file, spec.ray_temp_dir
    )
    cluster.nodes.append(start_node("head", _head_args(spec), env, logs))
    cluster.save()  # from here on `down` can clean up whatever happens next
    try:
        address_file = head_temp_dir / ADDRESS_FILE
        cluster.gcs_address = str(
            _wait_until(
                lambda: address_file.read_text().strip() if address_file.is_file() else None,
                "the head's GCS address",
                cluster.nodes,
                spec.start_timeout_s,
            )
        )
        _wait_until(_node_count_is(cluster, 1), "the head node", cluster.nodes, spec.start_timeout_s)
        for index in range(spec.workers):
            role = f"worker-{index}"
            worker_env = _worker_env(env, index, spec.worker_gpus)
            cluster.nodes.append(start_node(role, _worker_args(spec, cluster.gcs_address, role), worker_env, logs))
            cluster.save()
        _wait_until(
            _node_count_is(cluster, 1 + spec.workers),
            f"{spec.workers} worker node(s)",
            cluster.nodes,
            spec.start_timeout_s,
        )
    except BaseException:
        down(state_dir)
        raise
    cluster.save()
    return cluster


def down(state_dir: Path, grace_s: float = 30.0) -> bool:
    """Stop the cluster recorded in `state_dir`: workers first, then the head. False if none."""
    cluster = LocalCluster.load(state_dir.absolute())
    if cluster is None:
        return False
    stop_nodes(cluster.nodes[1:], grace_s)
    stop_nodes(cluster.nodes[:1], grace_s)
    (cluster.state_dir / STATE_FILE).unlink(missing_ok=True)
    return True


def status(state_dir: Path) -> dict:
    """What is recorded and what is alive, for `status` and for tests."""
    cluster = LocalCluster.load(state_dir.absolute())
    if cluster is None:
        return {"running": False, "state_dir": str(state_dir)}
    report = {
        "running": cluster.head_running(),
        "state_dir": str(cluster.state_dir),
        "gcs_address": cluster.gcs_address,
        "dashboard_url": cluster.dashboard_url,
        "token_path": str(cluster.token_path),
        "temp_dir": str(cluster.temp_dir),
        "processes": {node.role: live_process(node) is not None for node in cluster.nodes},
    }
    if report["running"]:
        try:
            nodes = alive_nodes(cluster.dashboard_url, cluster.token_path)
            report["alive_nodes"] = len(nodes)
            report["resources"] = [node["resources_total"] for node in nodes]
        except (OSError, urllib.error.URLError) as error:
            report["alive_nodes"] = f"dashboard not answering: {error}"
    return report
