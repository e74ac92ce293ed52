"""Benchmark: pretraining throughput of the Ray Train + DeepSpeed job (2 workers) against a plain
single-process PyTorch loop of the same model and global batch, and memory per worker at ZeRO-0 vs ZeRO-3.

All runs use the same synthetic timelines (tests/support/timeline_factory.py), model, window length and
global batch, in the same invocation. Throughput = non-pad target tokens per second over the last
`--steps - --warmup-steps` optimiser steps (validation and checkpoint time excluded in the job).
Memory per worker: peak RSS (CPU) or peak allocated (GPU), and the tensors of the model state
(parameters, gradients, optimiser) a worker holds, which is what ZeRO partitions.

    .venv/bin/python bench/train_throughput.py --out bench/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the timeline factory lives with the tests (tests.support)
from ehrfm.config import load_config  # noqa: E402
from ehrfm.constants import PAD_ID  # noqa: E402
from ehrfm.model import EHRDecoder  # noqa: E402
from ehrfm.training.config import PretrainConfig  # noqa: E402
from ehrfm.training.engine import build_optimizer  # noqa: E402
from ehrfm.training.windows import WindowCollate  # noqa: E402
from tests.support.timeline_factory import write_timelines  # noqa: E402


def bench_config(args, data_dir: Path, storage: Path, stage: int, name: str) -> PretrainConfig:
    overrides = [
        f"run.name={name}",
        f"run.storage_path={storage}",
        f"data.dir={data_dir}",
        f"data.batch_size={args.batch}",
        "data.val_max_windows=32",
        "data.materialize=true",
        f"model.hidden={args.hidden}",
        f"model.layers={args.layers}",
        f"model.heads={args.heads}",
        f"model.context={args.context}",
        f"model.fusion={args.fusion}",
        "model.prs_hidden=256",
        f"schedule.max_steps={args.steps}",
        f"schedule.log_every={args.steps - args.warmup_steps}",
        f"schedule.val_every={args.steps}",
        f"schedule.checkpoint_every={args.steps}",
        f"deepspeed.zero_stage={stage}",
        "deepspeed.stage3_param_persistence_threshold=0",
        f"deepspeed.reduce_bucket_size={args.bucket_elements}",
        f"deepspeed.stage3_prefetch_bucket_size={args.bucket_elements}",
        "mlflow.enabled=false",
        "optim.warmup_steps=2",
        f"scaling.num_workers={args.workers}",
        f"scaling.cpus_per_worker={args.cpus_per_worker}",
        f"scaling.torch_threads={args.threads_per_worker}",
    ]
    return load_config(PretrainConfig, REPO / "jobs" / "configs" / "pretrain-cpu-small.yaml", overrides)


def plain_loop(cfg: PretrainConfig, data_dir: Path, manifest: dict, args, threads: int) -> dict:
    """The same model, optimiser and global batch in one process, no Ray, no DeepSpeed."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model_cfg = cfg.model.with_data(manifest["vocab_size"], manifest["num_pgs"])
    model = EHRDecoder(model_cfg).train()
    optimizer = build_optimizer(model, cfg)
    table = pa.concat_tables(pq.read_table(p) for p in sorted((data_dir / "timelines").glob("*.parquet")))
    train = table.filter(pc.equal(table["split"], "train"))
    rng = np.random.default_rng(0)
    global_batch = args.batch * args.workers
    tokens, started = 0, 0.0
    for step in range(args.steps):
        if step == args.warmup_steps:
            tokens, started = 0, time.perf_counter()
        batch = WindowCollate(model_cfg.context, model_cfg.num_pgs, 0, step)(
            train.take(rng.choice(train.num_rows, global_batch, replace=False))
        )
        _, loss = model(batch["tokens"], batch["ages"], batch["prs"], batch["has_prs"], targets=batch["targets"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        tokens += int((batch["targets"] != PAD_ID).sum())
    elapsed = time.perf_counter() - started
    return {
        "threads": threads,
        "tokens_per_s": tokens / elapsed,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters": model.num_parameters(),
        "final_train_loss": float(loss.detach()),
    }


def ray_job(cfg: PretrainConfig, datasets: dict) -> dict:
    from ehrfm.training.pretrain import run_pretraining

    started = time.perf_counter()
    result = run_pretraining(cfg, datasets)
    m = result.metrics
    return {
        "tokens_per_s": m["tokens_per_s"],
        "peak_memory_mb_per_worker": m["peak_memory_mb_max_worker"],
        "model_state_mb_per_worker": m["model_state_mb_max_worker"],
        "final_train_loss": m["train_loss"],
        "wall_s_including_startup": time.perf_counter() - started,
    }


def markdown(results: dict) -> str:
    plain = results["plain_pytorch"]
    best = max(run["tokens_per_s"] for run in plain)
    rows = [
        "| run | tokens/s | vs best plain loop | peak memory / worker (MB) | model state / worker (MB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for run in plain:
        rows.append(
            f"| plain PyTorch, 1 process, {run['threads']} thread(s) | {run['tokens_per_s']:.0f} | "
            f"{run['tokens_per_s'] / best:.2f} | {run['peak_rss_mb']:.0f} (process RSS) | - |"
        )
    for label, key in (("ZeRO-0", "ray_zero0"), ("ZeRO-3", "ray_zero3")):
        run = results[key]
        rows.append(
            f"| Ray Train + DeepSpeed {label}, {results['shape']['workers']} workers | {run['tokens_per_s']:.0f} | "
            f"{run['tokens_per_s'] / best:.2f} | {run['peak_memory_mb_per_worker']:.0f} | "
            f"{run['model_state_mb_per_worker']:.1f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--persons", type=int, default=600)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--fusion", default="prefix")
    parser.add_argument("--batch", type=int, default=8, help="windows per worker per step")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument(
        "--bucket-elements",
        type=int,
        default=2_000_000,
        help="DeepSpeed reduce/all-gather/prefetch bucket size (elements); sized to the model",
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="smoke size")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.quick:
        args.persons, args.hidden, args.layers, args.steps, args.warmup_steps = 200, 64, 2, 12, 4
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    work = Path(tempfile.mkdtemp(prefix="ehrfm-bench-train-"))
    data_dir = work / "data"
    write_timelines(data_dir, persons=args.persons, vocab_size=args.vocab, num_pgs=64, files=2, max_events=400)
    manifest = json.loads((data_dir / "timelines" / "manifest.json").read_text())
    load_before = os.getloadavg()
    plain_cfg = bench_config(args, data_dir, work / "runs", 0, "plain")
    thread_counts = sorted({1, args.workers * args.threads_per_worker})
    plain = [plain_loop(plain_cfg, data_dir, manifest, args, threads) for threads in thread_counts]
    best_plain = max(run["tokens_per_s"] for run in plain)

    import ray

    from ehrfm.training.pretrain import load_datasets

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    datasets = load_datasets(bench_config(args, data_dir, work / "runs", 0, "data"))
    zero0 = ray_job(bench_config(args, data_dir, work / "runs", 0, "zero0"), datasets)
    zero3 = ray_job(bench_config(args, data_dir, work / "runs", 3, "zero3"), datasets)
    ray.shutdown()
    results = {
        "benchmark": "train_throughput",
        "shape": {
            "persons": args.persons,
            "vocab": args.vocab,
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "context": args.context,
            "fusion": args.fusion,
            "batch_per_worker": args.batch,
            "global_batch": args.batch * args.workers,
            "workers": args.workers,
            "steps": args.steps,
            "timed_steps": args.steps - args.warmup_steps,
            "parameters": plain[0]["parameters"],
            "threads_per_worker": args.threads_per_worker,
            "precision": "fp32",
            "stage3_param_persistence_threshold": 0,
            "bucket_elements": args.bucket_elements,
        },
        "plain_pytorch": plain,
        "ray_zero0": zero0,
        "ray_zero3": zero3,
        "ratios": {
            "ray_zero0_vs_best_plain": zero0["tokens_per_s"] / best_plain,
            "ray_zero3_vs_best_plain": zero3["tokens_per_s"] / best_plain,
            "model_state_zero3_vs_zero0": zero3["model_state_mb_per_worker"] / zero0["model_state_mb_per_worker"],
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average_at_start": [round(x, 2) for x in load_before],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "note": args.note,
        },
    }
    results["markdown"] = markdown(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(results["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
