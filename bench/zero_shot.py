"""Benchmark: zero-shot risk throughput (persons/s) and peak memory, the shared-prefix sampler
(`ehrfm.model.sampling.sample_trajectories`) against the sampler it replaced
(`sample_trajectories_reference`), same model, prompts and seeds, in the same run.

Each (case, sampler) runs in its own child process (so its peak memory is its own): the model and
prompts are rebuilt from the same seeds, a small warm-up call runs first, then one timed call over
all prompts; `--repeats` alternating runs of each, the fastest counts (all times are recorded). Peak memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the growth of the
process's peak RSS over its RSS before the timed call. The two samplers must return the same
tokens, stop codes and shares, and path probabilities within 1e-6 (checked here, reported).

The model is a demo-size decoder (pipeline-demo / pretrain-cpu-20k shape: hidden 64, 2 layers, 4
heads, PRS prefix) with random weights; its output layer gets a bias (untied) on EOS and on eight
gap tokens (the default tokenizer's bucket edges, 1 to 1,825 days) so continuations end in mixed
ways, as real ones do: at 128 new tokens about 30% by EOS, 55% at the 730-day horizon and 13%
truncated (zero-shot-t2d.yaml reports 11.5% truncated on the 20k cohort), 63 tokens on average.

    .venv/bin/python bench/zero_shot.py --out bench/results/zero_shot.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from ehrfm.constants import EOS_ID, PAD_ID
from ehrfm.model import EHRDecoder, ModelConfig
from ehrfm.model.sampling import sample_trajectories, sample_trajectories_reference

SAMPLERS = {"reference": sample_trajectories_reference, "shared_prefix": sample_trajectories}
GAP_EDGES_DAYS = [1, 7, 30, 90, 180, 365, 730, 1825]  # lower edges, as the default tokenizer's GAP/ buckets
GAP_IDS = list(range(4, 4 + len(GAP_EDGES_DAYS)))
TARGET_IDS = [100, 101, 102, 103]


def build(case: dict, shape: dict, device: str):
    """Model, prompt tensors, gap days and seeds of a case; identical in every process."""
    torch.manual_seed(shape["seed"])
    vocab = shape["vocab"]
    cfg = ModelConfig(
        vocab_size=vocab,
        num_pgs=shape["num_pgs"],
        hidden=shape["hidden"],
        layers=shape["layers"],
        heads=shape["heads"],
        context=max(case["prompt_length"], 16),
        fusion=shape["fusion"],
        prs_tokens=4,
        prs_hidden=128,
    )
    model = EHRDecoder(cfg).eval()
    with torch.no_grad():
        head = torch.nn.Linear(cfg.hidden, vocab, bias=True)
        head.weight.copy_(model.tok_emb.weight * 4.0)
        head.bias.zero_()
        head.bias[EOS_ID] = 2.5
        head.bias[GAP_IDS] = 2.5
        model.lm_head = head
    gen = torch.Generator().manual_seed(shape["seed"] + 1)
    prompts, length = case["prompts"], case["prompt_length"]
    tokens = torch.randint(8, vocab, (prompts, length), generator=gen)
    ages = 15_000 + torch.cumsum(torch.randint(0, 30, (prompts, length), generator=gen), dim=1)
    lengths = torch.randint(length // 2, length + 1, (prompts,), generator=gen)
    lengths[0] = length
    for row, n in enumerate(lengths.tolist()):
        tokens[row, n:], ages[row, n:] = PAD_ID, 0
    prs = torch.randn(prompts, cfg.num_pgs, generator=gen)
    has_prs = torch.rand(prompts, generator=gen) < 0.6
    gap_days = torch.zeros(vocab, dtype=torch.float64)
    gap_days[GAP_IDS] = torch.tensor(GAP_EDGES_DAYS, dtype=torch.float64)
    seeds = [1_000 * shape["seed"] + i for i in range(prompts)]
    on = torch.device(device)
    model = model.to(on, dtype=torch.bfloat16 if on.type == "cuda" else torch.float32)
    inputs = [t.to(on) for t in (tokens, ages, lengths, prs, has_prs)]
    return model, inputs, gap_days, seeds


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(spec: dict) -> dict:
    """One timed sampler call (in a fresh process); figures and a digest of its draws."""
    case, shape, sampler, device = spec["case"], spec["shape"], spec["sampler"], spec["device"]
    torch.set_num_threads(shape["threads"])
    model, inputs, gap_days, seeds = build(case, shape, device)
    settings = dict(
        n_samples=case["futures"],
        max_new_tokens=case["new_tokens"],
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        target_ids=TARGET_IDS,
        gap_days=gap_days,
        horizon_days=730.0,
    )
    fn = SAMPLERS[sampler]
    warm = [t[:1] for t in inputs]
    fn(model, *warm, seeds=seeds[:1], **(settings | {"max_new_tokens": min(8, case["new_tokens"])}))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    started = time.perf_counter()
    result = fn(model, *inputs, seeds=seeds, **settings)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
    generated = int((result.tokens != PAD_ID).sum())
    stops = torch.bincount(result.stop.long().cpu(), minlength=4).tolist()
    return {
        "sampler": sampler,
        "seconds": seconds,
        "persons_per_s": case["prompts"] / seconds,
        "generated_tokens_per_s": generated / seconds,
        "generated_tokens": generated,
        "peak_memory_mb": peak / 2**20,
        "peak_memory_kind": "cuda max_memory_allocated" if cuda else "peak RSS growth",
        "stops": dict(zip(["running", "eos", "horizon", "truncated"], stops)),
        "digest": hashlib.sha256(
            result.tokens.cpu().numpy().tobytes()
            + result.stop.cpu().numpy().tobytes()
            + result.hit.cpu().numpy().tobytes()
        ).hexdigest(),
        "share": result.share.cpu().tolist(),
        "path_probability": result.path_probability.cpu().tolist(),
    }


def run_child(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def markdown(results: dict) -> str:
    rows = [
        "| prompts x futures, prompt length, new tokens | sampler | time (s) | persons/s | tokens/s | "
        "peak memory (MB) | speed-up |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for case in results["cases"]:
        label = f"{case['prompts']} x {case['futures']}, {case['prompt_length']}, {case['new_tokens']}"
        for run in (case["reference"], case["shared_prefix"]):
            speed = run["persons_per_s"] / case["reference"]["persons_per_s"]
            rows.append(
                f"| {label} | {run['sampler']} | {run['seconds']:.2f} | {run['persons_per_s']:.2f} | "
                f"{run['generated_tokens_per_s']:.0f} | {run['peak_memory_mb']:.0f} | {speed:.1f}x |"
            )
    shape = results["shape"]
    rows.append("")
    rows.append(
        f"Demo-size decoder (hidden {shape['hidden']}, {shape['layers']} layers, {shape['heads']} heads, "
        f"vocabulary {shape['vocab']}, {shape['fusion']} fusion, {results['precision']}) on "
        f"{results['device']}, {shape['threads']} torch thread(s); same seeds, identical draws: "
        f"{'yes' if results['identical_draws'] else 'NO'} (max path-probability difference "
        f"{results['max_path_probability_difference']:.1e}). Peak memory: {results['peak_memory_kind']}. "
        f"Load average {results['machine']['load_average_at_start'][0]} at start, "
        f"{results['machine']['load_average_at_end'][0]} at end. Fastest of {results.get('repeats', 1)} "
        "alternating runs each."
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument(
        "--case",
        action="append",
        help="PROMPTSxFUTURES,PROMPT_LENGTH,NEW_TOKENS (repeatable); default 32x16,512,128, 16x16,512,128 and "
        "4x16,2048,128",
    )
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--fusion", default="prefix", choices=["none", "prefix", "cross"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the zero-shot actors' default is 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per sampler (alternating); the best counts")
    parser.add_argument("--quick", action="store_true", help="smoke size")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", required=False)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if not args.out:
        parser.error("--out is required")
    # 32 prompts: the zero-shot config's batch_size (prompts per actor call); 16: the first row
    cases = args.case or (["4x8,128,16"] if args.quick else ["32x16,512,128", "16x16,512,128", "4x16,2048,128"])
    args.repeats = 1 if args.quick else args.repeats
    shape = {
        "vocab": args.vocab,
        "num_pgs": 64,
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": args.heads,
        "fusion": args.fusion,
        "threads": args.threads,
        "seed": args.seed,
    }
    load_before = os.getloadavg()
    results_cases, identical, max_diff, kinds = [], True, 0.0, set()
    for text in cases:
        counts, length, new = text.split(",")
        prompts, futures = (int(x) for x in counts.lower().split("x"))
        case = {"prompts": prompts, "futures": futures, "prompt_length": int(length), "new_tokens": int(new)}
        runs, seconds = {}, {"reference": [], "shared_prefix": []}
        for attempt in range(args.repeats):  # alternate the samplers, so a burst of load hits both alike
            for sampler in ("reference", "shared_prefix"):
                print(f"== {text}: {sampler} ({attempt + 1}/{args.repeats})", flush=True)
                run = run_child({"case": case, "shape": shape, "sampler": sampler, "device": args.device})
                seconds[sampler].append(round(run["seconds"], 3))
                kinds.add(run["peak_memory_kind"])
                if sampler not in runs or run["seconds"] < runs[sampler]["seconds"]:
                    runs[sampler] = run  # the best of the repeats
        for sampler, times in seconds.items():
            runs[sampler]["all_seconds"] = times
        ref, new_run = runs["reference"], runs["shared_prefix"]
        same = ref["digest"] == new_run["digest"] and ref["share"] == new_run["share"]
        diff = max(abs(a - b) for a, b in zip(ref["path_probability"], new_run["path_probability"]))
        identical &= same and diff <= 1e-6
        max_diff = max(max_diff, diff)
        results_cases.append(
            case
            | {
                "reference": {k: v for k, v in ref.items() if k not in ("share", "path_probability")},
                "shared_prefix": {k: v for k, v in new_run.items() if k not in ("share", "path_probability")},
                "speedup_persons_per_s": new_run["persons_per_s"] / ref["persons_per_s"],
                "peak_memory_ratio": new_run["peak_memory_mb"] / max(ref["peak_memory_mb"], 1e-9),
                "identical_draws": same,
                "max_path_probability_difference": diff,
            }
        )
        print(
            f"   {ref['persons_per_s']:.2f} -> {new_run['persons_per_s']:.2f} persons/s "
            f"({new_run['persons_per_s'] / ref['persons_per_s']:.1f}x), same draws: {same}",
            flush=True,
        )
    results = {
        "benchmark": "zero_shot",
        "shape": shape,
        "device": args.device if args.device != "cpu" else f"CPU ({os.cpu_count()} cores)",
        "precision": "bf16" if args.device.startswith("cuda") else "fp32",
        "cases": results_cases,
        "repeats": args.repeats,
        "command": "python bench/zero_shot.py --out bench/results/zero_shot.json"
        + ("" if args.case is None else " " + " ".join(f"--case {c}" for c in args.case)),
        "identical_draws": identical,
        "max_path_probability_difference": max_diff,
        "peak_memory_kind": ", ".join(sorted(kinds)),
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
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
