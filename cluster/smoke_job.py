"""Is this cluster usable for ehrfm jobs? Every alive node imports `ehrfm` in a task.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python cluster/smoke_job.py

Prints one JSON line, `EHRFM_SMOKE {...}`, with where the driver and each node imported `ehrfm`
from, and exits non-zero when a node cannot import it or fewer nodes than `--expect-nodes` are alive.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def import_ehrfm() -> dict[str, str]:
    import ehrfm

    return {"ehrfm": ehrfm.__file__, "cwd": os.getcwd(), "version": ehrfm.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expect-nodes", type=int, default=1)
    args = parser.parse_args(argv)

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init()
    nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    remote_import = ray.remote(num_cpus=1)(import_ehrfm)
    pinned = [
        remote_import.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
        for node in nodes
    ]
    report = {"driver": import_ehrfm(), "nodes": dict(zip(nodes, ray.get(pinned, timeout=300)))}
    print("EHRFM_SMOKE " + json.dumps(report), flush=True)
    if len(nodes) < args.expect_nodes:
        print(f"only {len(nodes)} alive node(s), expected {args.expect_nodes}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
