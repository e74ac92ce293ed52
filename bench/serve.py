"""Benchmark: online scoring through Ray Serve against the floor of Serve itself, open loop.

For each application, requests are offered at 10, 50 and 100 per second (evenly spaced, bounded
in flight, 2 s timeout: bench/_open_loop.py) for `--seconds` each, after a warm-up:
- `echo floor`: a Serve app that answers without work (bench/_echo_app.py, one hop): what the
  proxy, a replica and HTTP cost on this machine;
- `ehrfm one_hop` (the default ServeConfig: 2 model replicas that are the ingress, adaptive
  batching) and `ehrfm two_hop` (a retrying ScoringAPI ingress in front of 2 model replicas).
Single-person `POST /v1/score`, bearer auth on. Per rate: completed requests/s, p50/p95/p99
latency, errors (non-200s and timeouts), CPU per completed request (every process of the local
Ray cluster) and its ratio to the echo floor's at the same rate. Then `POST /v1/score:batch`
(32 persons per request, 4 clients) gives persons/s.

The model is the demo size with random weights (hidden 64, 2 layers, 128-token window, 128 PGS;
weights do not change the cost), the persons made up (ehrfm.serve.smoke.synthetic_persons, 20-80
events each, half with a full PRS vector). The load generator shares the machine's cores.

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


RATES = (10.0, 50.0, 100.0)
BATCH_PERSONS = 32
EXPLAIN_RATE, SCORE_RATE_BESIDE = 3.0, 50.0


def scoring_beside_explanations(score_url: str, explain_url: str, bodies: list[bytes], token: str, seconds: float):
    """Scoring at SCORE_RATE_BESIDE/s while explanations are asked for at EXPLAIN_RATE/s (each one
    rescoring up to 64 variants of the person): do explanations starve scoring?"""
    import threading

    from _open_loop import open_loop

    explained: dict = {}
    thread = threading.Thread(
        target=lambda: explained.update(open_loop(explain_url, bodies, EXPLAIN_RATE, seconds, token, 10.0).row())
    )
    thread.start()
    scored = open_loop(score_url, bodies, SCORE_RATE_BESIDE, seconds, token).row()
    thread.join()
    return {
        "score_offered_per_s": SCORE_RATE_BESIDE,
        "score_p50_ms": scored["p50_ms"],
        "score_p99_ms": scored["p99_ms"],
        "score_errors": scored["errors"],
        "explain_offered_per_s": EXPLAIN_RATE,
        "explain_completed": explained["completed"],
        "explain_p50_ms": explained["p50_ms"],
        "explain_errors": explained["errors"],
    }


async def drive_batch(url: str, bodies: list[bytes], concurrency: int, token: str) -> tuple[float, int]:
    """Send every batch body once, `concurrency` at a time; (wall seconds, non-200s)."""
    import aiohttp

    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    errors = 0
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}

    async def client(session) -> None:
        nonlocal errors
        while not queue.empty():
            body = queue.get_nowait()
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                errors += response.status != 200

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        return time.perf_counter() - start, errors


def markdown(rows: list[dict], batch_rows: list[dict], explain_rows: list[dict], seconds: float) -> str:
    lines = [
        f"Single-person `POST /v1/score`, open loop, {seconds:.0f} s per rate, bearer auth on; CPU = every "
        "process of the local Ray cluster per completed request.",
        "",
        "| application | offered/s | completed/s | p50 ms | p95 ms | p99 ms | errors | CPU ms/request | CPU vs floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['application']} | {r['offered_per_s']:.0f} | {r['completed_per_s']:.1f} | {r['p50_ms']:.1f} "
            f"| {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {r['service_cpu_ms_per_request']:.1f} "
            f"| {r['cpu_vs_floor']:.2f}x |"
        )
    lines += ["", f"`POST /v1/score:batch`, {BATCH_PERSONS} persons per request, 4 clients:", ""]
    lines += ["| application | persons/s | errors |", "|---|---|---|"]
    for r in batch_rows:
        lines.append(f"| {r['application']} | {r['persons_per_s']:.0f} | {r['errors']} |")
    for r in explain_rows:
        lines += [
            "",
            f"ehrfm one_hop scoring at {r['score_offered_per_s']:.0f}/s while `POST /v1/explain` is offered at "
            f"{r['explain_offered_per_s']:.0f}/s: scoring p50 {r['score_p50_ms']:.1f} ms, p99 {r['score_p99_ms']:.1f} ms, "
            f"{r['score_errors']} errors; explanations: {r['explain_completed']} completed, p50 "
            f"{r['explain_p50_ms']:.0f} ms, {r['explain_errors']} errors (10 s timeout).",
        ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="offered load per rate")
    parser.add_argument("--num-pgs", type=int, default=128)
    parser.add_argument("--batch-requests", type=int, default=60, help="score:batch requests per application")
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="smoke size: 2 s per rate")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.batch_requests = 2.0, 8

    import ray
    from ray import cloudpickle, serve

    import _echo_app  # bench/ is sys.path[0] when run as a script
    from _open_loop import open_loop
    from ehrfm.serve.app import build_app, wait_ready
    from ehrfm.serve.auth import ensure_token
    from ehrfm.serve.config import AuthConfig, ServeConfig
    from ehrfm.serve.smoke import synthetic_persons

    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    model_dir = write_model(workdir / "model", args.num_pgs)
    tokenizer = Tokenizer.load(model_dir / "tokenizer.json")
    pgs_ids = [f"PGS{i:06d}" for i in range(args.num_pgs)]
    persons = synthetic_persons(tokenizer, pgs_ids, 200, seed=1, events_per_person=(20, 80))
    bodies = [json.dumps(p).encode() for p in persons]
    batch_bodies = [
        json.dumps(
            {"persons": [persons[(i * BATCH_PERSONS + j) % len(persons)] for j in range(BATCH_PERSONS)]}
        ).encode()
        for i in range(args.batch_requests)
    ]

    # the service as deployed: bearer auth on, the token in a 0600 file the replicas read
    auth = AuthConfig(token_file=str(workdir / "serve_token"))
    token = ensure_token(auth).token  # EHRFM_SERVE_TOKEN when set: the replicas inherit it too
    cloudpickle.register_pickle_by_value(_echo_app)  # the replicas cannot import bench/
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    applications = [
        ("echo floor", _echo_app.one_hop),
        ("ehrfm one_hop", lambda: build_app({"model_uri": str(model_dir), "auth": auth.model_dump()})),
        (
            "ehrfm two_hop",
            lambda: build_app({"model_uri": str(model_dir), "auth": auth.model_dump(), "topology": "two_hop"}),
        ),
    ]
    rows: list[dict] = []
    batch_rows: list[dict] = []
    explain_rows: list[dict] = []
    floor: dict[float, float] = {}
    try:
        for label, make in applications:
            serve.run(make(), name="bench", route_prefix="/")
            if label != "echo floor":
                wait_ready(base)
            url = f"{base}/v1/score"
            open_loop(url, bodies, 20.0, 3.0, token)  # warm-up: imports, first batches, connections
            for rate in RATES:
                result = open_loop(url, bodies, rate, args.seconds, token).row()
                if label == "echo floor":
                    floor[rate] = result["service_cpu_ms_per_request"]
                result.update(
                    application=label,
                    completed_per_s=round(result["completed"] / result["seconds"], 2),
                    cpu_vs_floor=round(result["service_cpu_ms_per_request"] / floor[rate], 3),
                )
                rows.append(result)
                print(result, flush=True)
            if label == "ehrfm one_hop":
                explain_rows.append(scoring_beside_explanations(url, f"{base}/v1/explain", bodies, token, args.seconds))
                print(explain_rows[-1], flush=True)
            if label != "echo floor":
                wall, errors = asyncio.run(drive_batch(f"{base}/v1/score:batch", batch_bodies, 4, token))
                batch_rows.append(
                    {
                        "application": label,
                        "requests": len(batch_bodies),
                        "persons_per_request": BATCH_PERSONS,
                        "seconds": round(wall, 3),
                        "persons_per_s": round(len(batch_bodies) * BATCH_PERSONS / wall, 1),
                        "errors": errors,
                    }
                )
                print(batch_rows[-1], flush=True)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()

    defaults = ServeConfig(model_uri=str(model_dir))
    result = {
        "benchmark": "serve",
        "shape": {
            "persons": len(persons),
            "events_per_person": [20, 80],
            "num_pgs": args.num_pgs,
            "model": {"hidden": 64, "layers": 2, "context": 128},
            "seconds_per_rate": args.seconds,
            "rates": list(RATES),
        },
        "settings": {
            "model_replicas": defaults.model_deployment.num_replicas,
            "model_replica_num_cpus": defaults.model_deployment.num_cpus,
            "batching": defaults.batching.model_dump(),
            "open_loop": {"timeout_s": 2.0, "max_in_flight": 256},
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "load_average_at_start": [round(x, 2) for x in load_before],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "note": args.note,
        },
        "results": rows,
        "batch": batch_rows,
        "explain_beside_scoring": explain_rows,
        "markdown": markdown(rows, batch_rows, explain_rows, args.seconds),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
