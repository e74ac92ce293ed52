"""#16's GPU measurement in one call: the real `jobs/pretrain.py` (Ray Train + DeepSpeed, one worker)
on the same data twice, as the recipe and as the baseline, and the figures side by side.

- `recipe`: the config as written (`pretrain-gpu-300m.yaml`: packed windows, fused loss, compile,
  bf16, ZeRO-2).
- `baseline`: the same run without packing, fused loss or compile, at the old budget of
  `--baseline-batch` windows per micro-step (what the issue measured at 23.7% MFU).

Each variant is its own `jobs/pretrain.py` process and Ray cluster, so nothing is shared between them
but the disk (DeepSpeed's JIT-built op is cached there after the first). The figures come from the
run's own `pretrain_result.json`: the throughput window of the last `--log-every` steps (the
compile and the first steps fall in earlier windows), real tokens/s, positions/s, useful-token
fraction, MFU on real tokens and on positions (peak looked up from the GPU's name), peak memory of
the worker. A variant that fails leaves its log and return code in the results; the next one still
runs. Everything goes to `--out`: `gpu_pretrain.json`, `gpu_pretrain.md` and one log per variant.

On the GPU machine (see ../shared/gpu/README.md for the wheels), from the project root:

    bench/gpu_pretrain.sh .gpu-data/preprocessed "$OUT"

Check the script on CPU first (a small model, a few steps, no MFU without a GPU peak):

    .venv/bin/python bench/gpu_pretrain.py --smoke --data runs/bench/default-cohort/preprocessed --out /tmp/g
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ehrfm.training.pretrain import RESULT_FILE

REPO = Path(__file__).resolve().parents[1]
FIGURES = (
    "mfu_real_tokens",
    "mfu_positions",
    "tokens_per_s",
    "positions_per_s",
    "useful_token_fraction",
    "step_time_s",
    "peak_memory_mb_max_worker",
    "model_state_mb_max_worker",
    "train_loss",
    "val_loss",
)
BASELINE_OFF = ["performance.packing=false", "performance.fused_loss=false", "performance.compile=false"]


def variant_overrides(args: argparse.Namespace) -> dict[str, list[str]]:
    """Per variant, the config overrides on top of the shared ones (recipe first: it is the target)."""
    recipe: list[str] = []
    baseline = [*BASELINE_OFF, f"data.batch_size={args.baseline_batch}"]
    if args.smoke:
        recipe = ["performance.compile=false"]  # compiling on CPU costs minutes and shows nothing here
    return {"recipe": recipe, "baseline": baseline}


def shared_overrides(args: argparse.Namespace, storage: Path) -> list[str]:
    """One worker, a short schedule whose last window is steady state, a small validation set, no MLflow."""
    overrides = [
        f"run.storage_path={storage}",
        "scaling.num_workers=1",
        f"scaling.cpus_per_worker={args.cpus_per_worker}",
        "mlflow.enabled=false",
        f"schedule.max_steps={args.steps}",
        f"optim.warmup_steps={args.steps // 2}",  # must end before the last step; the rate does not change the speed
        f"schedule.log_every={args.log_every}",
        f"schedule.val_every={args.steps}",
        f"schedule.checkpoint_every={args.steps}",
        "schedule.keep_checkpoints=1",
        f"data.val_max_windows={args.val_windows}",
    ]
    if args.smoke:
        overrides += ["scaling.use_gpu=false", "deepspeed.precision=fp32"]
    return overrides + list(args.override)


def run_variant(name: str, command: list[str], log: Path, result: Path, timeout_s: float) -> dict:
    """Run one variant to its end (or its timeout); its figures, or the reason there are none."""
    started = time.perf_counter()
    with log.open("w") as sink:
        try:
            code = subprocess.run(
                command, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=REPO
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    row: dict = {"variant": name, "returncode": code, "wall_s": round(time.perf_counter() - started, 1)}
    if code == 0 and result.is_file():
        metrics = json.loads(result.read_text()).get("metrics", {})
        row.update({key: metrics[key] for key in FIGURES if key in metrics})
    else:
        row["log_tail"] = log.read_text(errors="replace")[-3000:]
    return row


def device_name() -> str:
    """The GPU's name from nvidia-smi (this process never initialises CUDA: the runs own the device)."""
    try:
        names = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        ).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        names = []
    names = [name.strip() for name in names if name.strip()]
    return ", ".join(names) if names else f"CPU ({os.cpu_count()} cores)"


def markdown(result: dict) -> str:
    """The table #16's acceptance reads: MFU on real tokens, useful-token fraction, peak memory."""

    def cell(row: dict, key: str, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
        return f"{row[key] * scale:,.{digits}f}{unit}" if key in row else "—"

    lines = [
        f"`jobs/pretrain.py --config {result['config']}`, 1 worker, {result['steps']} steps, figures over the "
        f"last {result['log_every']}; device: {result['device']}.",
        "",
        "| variant | MFU, real tokens | MFU, positions | real tokens/s | positions/s | useful-token fraction "
        "| step s | peak memory GiB | wall s | rc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["variants"]:
        lines.append(
            f"| {row['variant']} | {cell(row, 'mfu_real_tokens', 100, 1, '%')} | {cell(row, 'mfu_positions', 100, 1, '%')} "
            f"| {cell(row, 'tokens_per_s', 1, 0)} | {cell(row, 'positions_per_s', 1, 0)} "
            f"| {cell(row, 'useful_token_fraction', 1, 3)} | {cell(row, 'step_time_s', 1, 3)} "
            f"| {cell(row, 'peak_memory_mb_max_worker', 1 / 1024, 1)} | {row['wall_s']} | {row['returncode']} |"
        )
    rows = {row["variant"]: row for row in result["variants"]}
    if all("tokens_per_s" in rows.get(v, {}) for v in ("recipe", "baseline")):
        ratio = rows["recipe"]["tokens_per_s"] / rows["baseline"]["tokens_per_s"]
        lines += ["", f"Real tokens/s, recipe over baseline: {ratio:.2f}x."]
    return "\n".join(lines)


PREPARED = ("timelines", "tokenizer.json", "metadata")  # what pretraining reads of a preprocessed folder


def prepare_data(target: Path) -> Path:
    """Copy the default synthetic cohort's timelines (made once by bench/train_throughput.py, ~4 MB)
    to `target`/preprocessed, a folder small enough to travel to the GPU machine beside the wheels."""
    sys.path.insert(0, str(REPO / "bench"))
    from train_throughput import default_cohort

    source = default_cohort()
    dest = target / "preprocessed"
    for name in PREPARED:
        if (source / name).is_dir():
            shutil.copytree(source / name, dest / name, dirs_exist_ok=True)
        elif (source / name).is_file():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, dest / name)
    return dest


def write_results(out: Path, header: dict, rows: list[dict]) -> str:
    """gpu_pretrain.json / .md with the runs so far (after each run: a cut-off call keeps what it
    measured); the table."""
    result = {**header, "variants": rows}
    result["markdown"] = markdown(result)
    (out / "gpu_pretrain.json").write_text(json.dumps(result, indent=2))
    (out / "gpu_pretrain.md").write_text(result["markdown"] + "\n")
    return result["markdown"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="preprocessed directory holding timelines/")
    parser.add_argument("--out", help="results folder")
    parser.add_argument(
        "--prepare-data", type=Path, help="only copy the default cohort's timelines to DIR/preprocessed"
    )
    parser.add_argument("--config", default="jobs/configs/pretrain-gpu-300m.yaml")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per variant (at least 2)")
    parser.add_argument("--log-every", type=int, default=10, help="steps per throughput window (the last one counts)")
    parser.add_argument("--baseline-batch", type=int, default=8, help="windows per micro-step without packing")
    parser.add_argument("--val-windows", type=int, default=64)
    parser.add_argument("--cpus-per-worker", type=int, default=8)
    parser.add_argument("--storage", default=None, help="checkpoint storage (default: a folder under /tmp)")
    parser.add_argument(
        "--timeout-s", type=float, default=280.0, help="per variant (two fit in a 600-s device call with the install)"
    )
    parser.add_argument("--variants", nargs="*", default=["recipe", "baseline"])
    parser.add_argument("--smoke", action="store_true", help="CPU check of this script: small model, few steps")
    parser.add_argument("override", nargs="*", help="extra key=value config overrides for every variant")
    args = parser.parse_args(argv)
    if args.prepare_data:
        print(prepare_data(args.prepare_data))
        return 0
    if not (args.data and args.out):
        parser.error("--data and --out are required")
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    if args.smoke:
        args.config, args.steps, args.log_every, args.val_windows = "jobs/configs/pretrain-cpu-small.yaml", 6, 3, 8
        args.baseline_batch, args.cpus_per_worker = 4, 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    storage = Path(args.storage or f"/tmp/ehrfm-gpu-pretrain-{os.getpid()}")
    overrides = variant_overrides(args)
    unknown = set(args.variants) - set(overrides)
    if not args.variants or unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {sorted(overrides)}")
    header = {
        "benchmark": "gpu_pretrain",
        "config": args.config,
        "steps": args.steps,
        "log_every": args.log_every,
        "device": device_name(),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count()},
        "overrides": {"shared": shared_overrides(args, storage), **overrides},
    }
    rows: list[dict] = []
    table = ""
    for name in args.variants:
        command = [sys.executable, "jobs/pretrain.py", "--config", args.config, "--data", args.data, "--name", name]
        command += shared_overrides(args, storage) + overrides[name]
        print(f"[gpu_pretrain] {name}: {' '.join(command[1:])}", flush=True)
        row = run_variant(name, command, out / f"{name}.log", storage / name / RESULT_FILE, args.timeout_s)
        print(f"[gpu_pretrain] {name}: {json.dumps({k: v for k, v in row.items() if k != 'log_tail'})}", flush=True)
        rows.append(row)
        shutil.rmtree(storage / name, ignore_errors=True)  # checkpoints of a 300M model: GBs of disk
        table = write_results(out, header, rows)
    print(table, flush=True)
    return 0 if all(row["returncode"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
