"""Benchmark: online scoring through Ray Serve against the floor of Serve itself, open loop, per HTTP ingress.

The ingress is a property of the Ray cluster (platform/ehrfm/serve/ingress.py), so each one runs in a
process and local cluster of its own, one after the other:
- `haproxy` (what `ehrfm serve` starts): Serve's HAProxy direct ingress;
- `haproxy+throughput`: the same with Serve's throughput-optimized settings
  (RAY_SERVE_THROUGHPUT_OPTIMIZED=1: no separate user-code thread, GC frozen after start, buffered logs);
- `proxy`: Serve's Python HTTP proxy.
On each, requests are offered at 10, 50 and 100 per second (evenly spaced, bounded in flight, 2 s
timeout: bench/_open_loop.py) for `--seconds` each, after a warm-up, to:
- `echo floor`: a Serve app that answers without work (bench/_echo_app.py, one hop): what the ingress,
  a replica and HTTP cost on this machine;
- `ehrfm one_hop` (the default ServeConfig: 2 model replicas that are the ingress, adaptive batching)
  and, on `haproxy` and `proxy`, `ehrfm two_hop` (a retrying ScoringAPI ingress in front of 2 model
  replicas: the price of a model replica's death failing no request, docs/OPERATIONS.md "Failures").
Single-person `POST /v1/score`, bearer auth on. Per rate: completed requests/s, p50/p95/p99
latency, errors (non-200s and timeouts), CPU per completed request (every process of the local
Ray cluster, HAProxy included) and its ratio to the echo floor's on the same ingress at the same
rate. Then `POST /v1/score:batch` (32 persons per request, 4 clients) gives persons/s, and on the
default ingress scoring runs beside explanations. Last, the least a request can cost ehrfm beyond
the floor: parsing and validating the request body and scoring it alone, in this process, one
thread (the bound of "CPU per request vs floor").

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

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
DEFAULT_INGRESS = "haproxy"
# ingress -> (extra environment of its cluster, applications measured on it)
INGRESSES: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "haproxy": ({}, ("echo floor", "ehrfm one_hop", "ehrfm two_hop")),
    "haproxy+throughput": ({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}, ("echo floor", "ehrfm one_hop")),
    "proxy": ({}, ("echo floor", "ehrfm one_hop", "ehrfm two_hop")),
}
BUSY_MACHINE_CORES = 0.25  # other work above this during a window flags the run as not idle
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


def machine_load_line(rows: list[dict]) -> str:
    """One sentence on what the rest of the machine used during the scoring windows, flagged when it
    is more than BUSY_MACHINE_CORES: p99 then measures the machine's spare CPU, not only the service."""
    other = [r["other_cpu_cores"] for r in rows]
    worst = max(rows, key=lambda r: r["other_cpu_cores"])
    where = f"{worst['ingress']} {worst['application']} at {worst['offered_per_s']:.0f}/s"
    if worst["other_cpu_cores"] > BUSY_MACHINE_CORES:
        return (
            f"**Not an idle machine:** other processes used up to {worst['other_cpu_cores']:.2f} cores during a "
            f"scoring window ({where}; median {float(np.median(other)):.2f}), more than {BUSY_MACHINE_CORES} of "
            f"{os.cpu_count()}. Latencies here include that contention; CPU per request does not."
        )
    return (
        f"Other processes on the machine used at most {worst['other_cpu_cores']:.2f} cores during any scoring "
        f"window ({where}): an otherwise idle machine (flagged above {BUSY_MACHINE_CORES} cores)."
    )


def markdown(result: dict) -> str:
    seconds = result["shape"]["seconds_per_rate"]
    lines = [
        f"Single-person `POST /v1/score`, open loop, {seconds:.0f} s per rate, bearer auth on; CPU = every "
        'process of the local Ray cluster per completed request; "vs floor": against the echo floor on the '
        "same ingress (`haproxy` is what `ehrfm serve` starts).",
        "",
        "| ingress | application | offered/s | completed/s | p50 ms | p95 ms | p99 ms | errors | CPU ms/request "
        "| CPU vs floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['ingress']} | {r['application']} | {r['offered_per_s']:.0f} | {r['completed_per_s']:.1f} "
            f"| {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} "
            f"| {r['service_cpu_ms_per_request']:.1f} | {r['cpu_vs_floor']:.2f}x |"
        )
    lines += ["", machine_load_line(result["results"])]
    lines += ["", f"`POST /v1/score:batch`, {BATCH_PERSONS} persons per request, 4 clients:", ""]
    lines += ["| ingress | application | persons/s | errors |", "|---|---|---|---|"]
    for r in result["batch"]:
        lines.append(f"| {r['ingress']} | {r['application']} | {r['persons_per_s']:.0f} | {r['errors']} |")
    for r in result["explain_beside_scoring"]:
        lines += [
            "",
            f"ehrfm one_hop ({r['ingress']}) scoring at {r['score_offered_per_s']:.0f}/s while `POST /v1/explain` is "
            f"offered at {r['explain_offered_per_s']:.0f}/s: scoring p50 {r['score_p50_ms']:.1f} ms, p99 "
            f"{r['score_p99_ms']:.1f} ms, {r['score_errors']} errors; explanations: {r['explain_completed']} "
            f"completed, p50 {r['explain_p50_ms']:.0f} ms, {r['explain_errors']} errors (10 s timeout).",
        ]
    bound = result["request_cost_in_process"]
    floor = next(
        r["service_cpu_ms_per_request"]
        for r in result["results"]
        if r["ingress"] == DEFAULT_INGRESS and r["application"] == "echo floor" and r["offered_per_s"] == RATES[-1]
    )
    lines += [
        "",
        f"The least a request costs ehrfm beyond the floor (in process, 1 thread, no Serve): parse + validate "
        f"{bound['parse_ms']:.2f} ms, score alone {bound['score_ms']:.2f} ms (in batches of 8: "
        f"{bound['score_ms_batch8']:.2f} ms per person); with the {DEFAULT_INGRESS} echo floor at "
        f"{RATES[-1]:.0f}/s ({floor:.1f} ms) that bounds CPU vs floor at "
        f"{(floor + bound['parse_ms'] + bound['score_ms']) / floor:.2f}x for single-person batches.",
    ]
    return "\n".join(lines)


def request_cost_in_process(model_dir: Path, bodies: list[bytes]) -> dict:
    """CPU ms per request of what ehrfm must do whatever the ingress: parse and validate the body, score."""
    from ehrfm.serve.scoring import score_records
    from ehrfm.transfer.predictor import PersonRecord, RiskPredictor

    torch.set_num_threads(1)  # a replica of num_cpus 0.5 gets one thread (OMP_NUM_THREADS from Ray)
    predictor = RiskPredictor.load(model_dir)
    records = [PersonRecord.model_validate_json(b) for b in bodies]
    score_records(predictor, records[:8])  # warm-up

    def cpu_ms(fn, repeat: int) -> float:
        start = time.process_time()
        for _ in range(repeat):
            fn()
        return 1000.0 * (time.process_time() - start) / repeat

    n = len(bodies)
    parse = cpu_ms(lambda: [PersonRecord.model_validate_json(b) for b in bodies], 3) / n
    single = cpu_ms(lambda: [score_records(predictor, [r]) for r in records], 2) / n
    batch8 = cpu_ms(lambda: [score_records(predictor, records[i : i + 8]) for i in range(0, n, 8)], 2) / n
    return {
        "parse_ms": round(parse, 3),
        "score_ms": round(single, 3),
        "score_ms_batch8": round(batch8, 3),
        "persons": n,
    }


def measure_ingress(ingress: str, workdir: Path, num_pgs: int, seconds: float, batch_requests: int) -> dict:
    """Every application of `ingress` on a local cluster of this process (started with its environment)."""
    import ray
    from ray import cloudpickle, serve

    import _echo_app  # bench/ is sys.path[0] when run as a script
    from _open_loop import open_loop
    from ehrfm.cluster.local import free_port
    from ehrfm.serve.app import build_app, wait_ready
    from ehrfm.serve.auth import ensure_token
    from ehrfm.serve.config import AuthConfig

    model_dir = workdir / "model"
    bodies = json.loads((workdir / "bodies.json").read_text())
    bodies = [b.encode() for b in bodies]
    persons = [json.loads(b) for b in bodies]
    batch_bodies = [
        json.dumps(
            {"persons": [persons[(i * BATCH_PERSONS + j) % len(persons)] for j in range(BATCH_PERSONS)]}
        ).encode()
        for i in range(batch_requests)
    ]
    # the service as deployed: bearer auth on, the token in a 0600 file the replicas read
    auth = AuthConfig(token_file=str(workdir / "serve_token"))
    token = ensure_token(auth).token  # EHRFM_SERVE_TOKEN when set: the replicas inherit it too
    cloudpickle.register_pickle_by_value(_echo_app)  # the replicas cannot import bench/
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    makers = {
        "echo floor": _echo_app.one_hop,
        "ehrfm one_hop": lambda: build_app({"model_uri": str(model_dir), "auth": auth.model_dump()}),
        "ehrfm two_hop": lambda: build_app(
            {"model_uri": str(model_dir), "auth": auth.model_dump(), "topology": "two_hop"}
        ),
    }
    rows: list[dict] = []
    batch_rows: list[dict] = []
    explain_rows: list[dict] = []
    floor: dict[float, float] = {}
    try:
        for label in INGRESSES[ingress][1]:
            serve.run(makers[label](), name="bench", route_prefix="/")
            if label != "echo floor":
                wait_ready(base)
            url = f"{base}/v1/score"
            open_loop(url, bodies, 20.0, 3.0, token)  # warm-up: imports, first batches, connections
            for rate in RATES:
                result = open_loop(url, bodies, rate, seconds, token).row()
                if label == "echo floor":
                    floor[rate] = result["service_cpu_ms_per_request"]
                result.update(
                    ingress=ingress,
                    application=label,
                    completed_per_s=round(result["completed"] / result["seconds"], 2),
                    cpu_vs_floor=round(result["service_cpu_ms_per_request"] / floor[rate], 3),
                )
                rows.append(result)
                print(result, flush=True)
            if label == "ehrfm one_hop" and ingress == DEFAULT_INGRESS:
                beside = scoring_beside_explanations(url, f"{base}/v1/explain", bodies, token, seconds)
                explain_rows.append({"ingress": ingress, **beside})
                print(explain_rows[-1], flush=True)
            if label != "echo floor":
                wall, errors = asyncio.run(drive_batch(f"{base}/v1/score:batch", batch_bodies, 4, token))
                batch_rows.append(
                    {
                        "ingress": ingress,
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
    return {"results": rows, "batch": batch_rows, "explain_beside_scoring": explain_rows}


def run_ingress_process(ingress: str, workdir: Path, args: argparse.Namespace) -> dict:
    """`measure_ingress` in a child process whose environment selects the ingress of its cluster."""
    from ehrfm.serve.ingress import ingress_env

    env = dict(os.environ)
    env.update(ingress_env("proxy" if ingress == "proxy" else "haproxy", env, one_machine=True))
    env.update(INGRESSES[ingress][0])
    env.pop("RAY_ADDRESS", None)
    part = workdir / f"part-{ingress.replace('+', '-')}.json"
    command = [sys.executable, __file__, "--ingress", ingress, "--workdir", str(workdir), "--out", str(part)]
    command += ["--seconds", str(args.seconds), "--num-pgs", str(args.num_pgs)]
    command += ["--batch-requests", str(args.batch_requests)]
    subprocess.run(command, env=env, check=True)
    return json.loads(part.read_text())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="offered load per rate")
    parser.add_argument("--num-pgs", type=int, default=128)
    parser.add_argument("--batch-requests", type=int, default=60, help="score:batch requests per application")
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="smoke size: 2 s per rate")
    parser.add_argument("--ingress", choices=sorted(INGRESSES), help=argparse.SUPPRESS)  # one child's part
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--ingresses", nargs="*", choices=sorted(INGRESSES), default=list(INGRESSES), help="ingresses to measure"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.batch_requests = 2.0, 8
    if args.ingress:
        part = measure_ingress(args.ingress, args.workdir, args.num_pgs, args.seconds, args.batch_requests)
        Path(args.out).write_text(json.dumps(part))
        return 0

    from ehrfm.serve.config import ServeConfig
    from ehrfm.serve.smoke import synthetic_persons

    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    model_dir = write_model(workdir / "model", args.num_pgs)
    tokenizer = Tokenizer.load(model_dir / "tokenizer.json")
    pgs_ids = [f"PGS{i:06d}" for i in range(args.num_pgs)]
    persons = synthetic_persons(tokenizer, pgs_ids, 200, seed=1, events_per_person=(20, 80))
    bodies = [json.dumps(p) for p in persons]
    (workdir / "bodies.json").write_text(json.dumps(bodies))
    parts = [run_ingress_process(ingress, workdir, args) for ingress in args.ingresses]
    bound = request_cost_in_process(model_dir, [b.encode() for b in bodies])
    print(bound, flush=True)

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
            "ingresses": {name: {"env": env, "applications": list(apps)} for name, (env, apps) in INGRESSES.items()},
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
        "results": [row for part in parts for row in part["results"]],
        "batch": [row for part in parts for row in part["batch"]],
        "explain_beside_scoring": [row for part in parts for row in part["explain_beside_scoring"]],
        "request_cost_in_process": bound,
    }
    result["markdown"] = markdown(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
