"""Benchmark: single-person scoring over HTTP through Ray Serve, with and without dynamic batching,
with 1 and 2 model replicas: requests/s and p50/p95/p99 latency.

Every configuration serves the same risk model (random weights of the demo size: hidden 64,
2 layers, 128-token window, 128 PGS; a synthetic 400-code vocabulary; weights do not change
the cost) from a local risk-model directory, and gets the same made-up persons
(ehrfm.serve.smoke.synthetic_persons, 20-80 events each, half with a full PRS vector) from
`--concurrency` concurrent clients (aiohttp, one process), after a warm-up. "no batching" is
`max_batch_size: 1`; "batching" is `max_batch_size: 16, batch_wait_timeout_s: 0.005`. The
client, the proxy, the ingress and the replicas share the machine's cores.

    .venv/bin/python bench/serve.py --out bench/results/serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ehrfm.cluster.local import free_port
from ehrfm.model.config import ModelConfig
from ehrfm.model.risk import HeadSpec, RiskModel, save_risk_model
from ehrfm.model.transformer import EHRDecoder
from ehrfm.preprocess.tokenizer import Tokenizer, build_tokenizer, quantile_edges

CONFIGS = [  # (label, max_batch_size, model replicas)
    ("no batching, 1 replica", 1, 1),
    ("batching, 1 replica", 16, 1),
    ("no batching, 2 replicas", 1, 2),
    ("batching, 2 replicas", 16, 2),
]


def write_model(directory: Path, num_pgs: int, seed: int = 0) -> Path:
    """A demo-sized risk-model directory with random weights and a synthetic vocabulary."""
    rng = np.random.default_rng(seed)
    codes = {f"CONDITION/{100000 + i}": int(rng.integers(20, 500)) for i in range(250)}
    codes |= {f"MEASUREMENT/{300000 + i}": 300 for i in range(50)}
    codes |= {f"DRUG/{500000 + i}": int(rng.integers(20, 500)) for i in range(96)}
    codes |= {"GENDER/8507": 100, "GENDER/8532": 100, "RACE/0": 100, "ETHNICITY/0": 100}
    edges = {f"MEASUREMENT/{300000 + i}": quantile_edges(rng.normal(i, 1.0, 300), 10) for i in range(50)}
    tokenizer = build_tokenizer(
        codes, edges, min_count=1, n_bins=10, min_values_for_bins=20, gap_edges_days=[1, 7, 30, 90, 365]
    )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_path = directory.parent / "tokenizer.json"
    tokenizer.save(tokenizer_path)
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        num_pgs=num_pgs,
        hidden=64,
        layers=2,
        heads=4,
        context=128,
        fusion="prefix",
        prs_tokens=4,
        prs_hidden=128,
    )
    model = RiskModel(EHRDecoder(cfg), "last+prs").eval()
    reference = np.quantile(rng.uniform(0.01, 0.6, 1000), np.linspace(0, 1, 101))
    spec = HeadSpec(
        task="bench",
        horizon_days=730,
        context=128,
        pgs_ids=[f"PGS{i:06d}" for i in range(num_pgs)],
        tokenizer_version=tokenizer.version,
        platt=(1.0, -2.0),
        reference_quantiles=[float(q) for q in reference],
    )
    return save_risk_model(directory, model, spec, tokenizer_path)


async def drive(url: str, bodies: list[bytes], concurrency: int, token: str) -> tuple[list[float], float, int]:
    """Send every body once with `concurrency` in flight; (latencies in s, wall seconds, non-200s)."""
    import aiohttp

    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies: list[float] = []
    errors = 0
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}

    async def client(session) -> None:
        nonlocal errors
        while not queue.empty():
            body = queue.get_nowait()
            start = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                errors += response.status != 200
            latencies.append(time.perf_counter() - start)

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return latencies, wall, errors


def markdown(rows: list[dict], concurrency: int) -> str:
    lines = [
        f"Single-person `POST /v1/score`, {concurrency} concurrent clients.",
        "",
        "| configuration | requests/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['configuration']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} "
            f"| {r['p99_ms']:.1f} | {r['errors']} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=600, help="timed requests per configuration")
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-pgs", type=int, default=128)
    parser.add_argument("--replica-cpus", type=float, default=0.5, help="num_cpus of each model replica")
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="smoke size: 40 requests, 10 warm-up")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.warmup = 40, 10

    import ray
    from ray import serve

    from ehrfm.serve.app import build_app, wait_ready
    from ehrfm.serve.auth import ensure_token
    from ehrfm.serve.config import AuthConfig
    from ehrfm.serve.smoke import synthetic_persons

    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    model_dir = write_model(workdir / "model", args.num_pgs)
    tokenizer = Tokenizer.load(model_dir / "tokenizer.json")
    pgs_ids = [f"PGS{i:06d}" for i in range(args.num_pgs)]
    persons = synthetic_persons(tokenizer, pgs_ids, 200, seed=1, events_per_person=(20, 80))
    encoded = [json.dumps(p).encode() for p in persons]
    bodies = [encoded[i % len(encoded)] for i in range(args.requests)]
    warmup = [encoded[i % len(encoded)] for i in range(args.warmup)]

    # the service as deployed: bearer auth on, the token in a 0600 file the replicas read
    auth = AuthConfig(token_file=str(workdir / "serve_token"))
    token = ensure_token(auth).token  # EHRFM_SERVE_TOKEN when set: the replicas inherit it too
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        for label, batch_size, replicas in CONFIGS:
            app = build_app(
                {
                    "model_uri": str(model_dir),
                    "batching": {"max_batch_size": batch_size, "batch_wait_timeout_s": 0.005},
                    "model_deployment": {
                        "num_replicas": replicas,
                        "num_cpus": args.replica_cpus,
                        "max_ongoing_requests": 64,
                    },
                    "ingress_deployment": {"num_cpus": 0.25, "max_ongoing_requests": 256},
                    "auth": auth.model_dump(),
                }
            )
            serve.run(app, name="bench", route_prefix="/")
            wait_ready(base)
            asyncio.run(drive(f"{base}/v1/score", warmup, args.concurrency, token))
            latencies, wall, errors = asyncio.run(drive(f"{base}/v1/score", bodies, args.concurrency, token))
            ms = np.asarray(latencies) * 1000.0
            rows.append(
                {
                    "configuration": label,
                    "max_batch_size": batch_size,
                    "replicas": replicas,
                    "requests": len(bodies),
                    "seconds": round(wall, 3),
                    "requests_per_s": round(len(bodies) / wall, 2),
                    "p50_ms": round(float(np.percentile(ms, 50)), 2),
                    "p95_ms": round(float(np.percentile(ms, 95)), 2),
                    "p99_ms": round(float(np.percentile(ms, 99)), 2),
                    "errors": int(errors),
                }
            )
            print(rows[-1], flush=True)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()

    result = {
        "benchmark": "serve",
        "shape": {
            "persons": len(persons),
            "events_per_person": [20, 80],
            "num_pgs": args.num_pgs,
            "model": {"hidden": 64, "layers": 2, "context": 128},
            "requests": args.requests,
            "warmup": args.warmup,
            "concurrency": args.concurrency,
        },
        "settings": {"batch_wait_timeout_s": 0.005, "replica_num_cpus": args.replica_cpus, "ingress_replicas": 1},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "load_average_at_start": [round(x, 2) for x in load_before],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "note": args.note,
        },
        "results": rows,
        "markdown": markdown(rows, args.concurrency),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
