"""`ehrfm cluster up|down|status|env` (also `python -m ehrfm.cluster`): the local multi-node cluster from the shell."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ehrfm.cluster.local import LocalCluster, LocalClusterSpec, down, status, up
from ehrfm.tracking import DEFAULT_STATE_DIR, ensure_tracking_uri


def _default_worker_cpus(head_cpus: int, workers: int) -> int:
    return max(1, ((os.cpu_count() or 2) - head_cpus) // max(workers, 1))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ehrfm cluster", description="A Ray cluster of several nodes on one machine, token auth on."
    )
    parser.add_argument(
        "action",
        choices=["up", "down", "status", "env"],
        help="up: start (or reuse); down: stop; status: JSON report; env: shell exports for clients",
    )
    parser.add_argument(
        "--state-dir", type=Path, default=Path(os.environ.get("EHRFM_CLUSTER_DIR", DEFAULT_STATE_DIR / "cluster"))
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--head-cpus", type=int, default=1)
    parser.add_argument("--worker-cpus", type=int, default=None, help="default: the remaining cores, shared")
    parser.add_argument("--worker-gpus", type=int, default=0, help="GPUs per worker node (distinct devices)")
    parser.add_argument("--port", type=int, default=0, help="GCS port (default: a free one)")
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--object-store-memory", type=int, default=None, help="bytes per node")
    parser.add_argument("--temp-dir", type=Path, default=None, help="Ray's temp dir (default <state-dir>/ray)")
    parser.add_argument("--token-path", type=Path, default=None, help="token file (default <state-dir>/auth_token)")
    parser.add_argument(
        "--mlflow",
        action="store_true",
        help="start or reuse the local MLflow server first; jobs inherit MLFLOW_TRACKING_URI",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.action == "down":
        print("stopped" if down(args.state_dir) else f"no cluster recorded in {args.state_dir}")
        return 0
    if args.action == "status":
        report = status(args.state_dir)
        print(json.dumps(report, indent=2))
        return 0 if report["running"] else 1
    if args.action == "env":
        cluster = LocalCluster.load(args.state_dir.absolute())
        if cluster is None:
            print(f"no cluster recorded in {args.state_dir}", file=sys.stderr)
            return 1
        for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS"):
            print(f"export {key}={cluster.client_env({})[key]}")
        return 0
    running = LocalCluster.load(args.state_dir.absolute())
    if running is not None and running.head_running():
        print(f"already running (not restarted; `down` first to change it): {running.dashboard_url}")
        return 0
    if args.mlflow:
        print(f"MLflow at {ensure_tracking_uri()}")
    spec = LocalClusterSpec(
        state_dir=args.state_dir,
        workers=args.workers,
        head_cpus=args.head_cpus,
        worker_cpus=args.worker_cpus or _default_worker_cpus(args.head_cpus, args.workers),
        worker_gpus=args.worker_gpus,
        port=args.port,
        dashboard_port=args.dashboard_port,
        object_store_bytes=args.object_store_memory,
        temp_dir=args.temp_dir,
        token_path=args.token_path,
    )
    cluster = up(spec)
    print(f"Ray cluster up: {len(cluster.nodes)} node(s), GCS {cluster.gcs_address}, dashboard {cluster.dashboard_url}")
    print(f"logs: {cluster.state_dir / 'logs'} and {cluster.temp_dir}/<node>/session_latest/logs")
    print(f'clients: eval "$(cluster/local.sh env --state-dir {cluster.state_dir})"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
