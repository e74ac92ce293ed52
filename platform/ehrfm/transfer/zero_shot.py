"""Zero-shot risk from the pretrained generator, no fine-tuning: sample each person's next years and
count the target codes (ehrfm.model.sampling does the sampling; this module feeds it on Ray Data).

Each prediction window is scored by an actor that loads the decoder once
(`ray.data.from_arrow(examples).map_batches(ZeroShotScorer, ...)`). Every example's randomness
comes from a seed derived from (config seed, subject_id, prediction_time), so its scores do not
depend on how the rows are batched or spread over actors.

Time in a continuation moves only by gap tokens. A gap token covers a range of days
(`GAP/30-90D`); it advances the clock by its lower edge (`gap_time: lower`, the default: the
horizon is then never passed early, so no target that could fall inside it is cut off) or by the
bucket's midpoint (`gap_time: midpoint`; the open last bucket `GAP/1825D+` uses its lower edge).

Execution: the scoring actors run on GPUs when the Ray cluster has them (`device: auto`; one GPU
per actor by default, the decoder in bf16) and on CPU otherwise. An actor splits each batch into
chunks that fit the accelerator's free memory (`prompts_per_chunk`). The sampler shares each
prompt's keys/values among its continuations (ehrfm.model.sampling). Throughput (persons/s,
sampled tokens/s) goes to the summary and, when MLFLOW_TRACKING_URI is set, to MLflow.

Outputs: `<out>/zero_shot.parquet` (subject_id, prediction_time, split, label, zs_share,
zs_path_probability, zs_truncated) and `<out>/zero_shot_summary.json` (AUROC with bootstrap CI of
both scores per split, truncation counts, how the target codes mapped to the vocabulary, timing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pydantic import Field

from ehrfm.config import StrictModel, add_config_arguments, parse_config
from ehrfm.constants import PAD_ID
from ehrfm.meds.codes import CodeBook
from ehrfm.metrics import auroc_ci
from ehrfm.model.config import ModelConfig
from ehrfm.model.io import load_model, load_model_config
from ehrfm.model.sampling import sample_trajectories
from ehrfm.preprocess.tokenizer import Tokenizer, gap_token_names
from ehrfm.tasks.concept_sets import dataset_codebook
from ehrfm.tasks.definitions import CODE_DOMAINS, TaskDefinition, load_task, resolve_task
from ehrfm.transfer.examples import build_examples, example_tensors, read_labels

OUTPUT_FILE = "zero_shot.parquet"
SUMMARY_FILE = "zero_shot_summary.json"
SCORE_COLUMNS = ("zs_share", "zs_path_probability")
ROW_COLUMN = "row"  # example order, carried through Ray Data and dropped at the end
# per-example accounting the actors return; summed into the timing and dropped from the scores
TOKENS_COLUMN, SECONDS_COLUMN, DEVICE_COLUMN = "_zs_tokens", "_zs_actor_seconds", "_zs_device"
THROUGHPUT_KEYS = ("persons_per_s", "sampled_tokens_per_s", "persons_per_actor_s", "sampled_tokens", "devices")
ACCOUNT_KEY = b"ehrfm.zero_shot"  # schema metadata of the scores: target-code account and timing


class ZeroShotConfig(StrictModel):
    """Sampler and execution settings (jobs/configs/zero-shot-*.yaml)."""

    n_samples: int = Field(16, ge=1)  # continuations per prediction time
    max_new_tokens: int = Field(64, ge=1)  # a continuation still inside the horizon after this many is truncated
    temperature: float = Field(1.0, ge=0.0)  # 0: greedy
    top_k: int = Field(0, ge=0)  # 0: off
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # 1: off
    gap_time: Literal["lower", "midpoint"] = "lower"  # days a gap token advances the clock
    horizon_days: int | None = Field(None, gt=0)  # None: the task's horizon
    splits: list[str] = Field(default_factory=lambda: ["val", "test"])  # which examples to score
    batch_size: int = Field(32, ge=1)  # prediction times per map_batches call (x n_samples rows decoded)
    concurrency: int = Field(1, ge=1)  # scoring actors (on GPUs: at most one per num_gpus of the cluster's GPUs)
    num_cpus: float = Field(1.0, gt=0.0)  # per actor
    torch_threads: int = Field(1, ge=1)  # per actor
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: GPUs when the cluster has them, else CPU
    num_gpus: float = Field(1.0, gt=0.0)  # per actor, on GPUs
    gpu_batch_size: int = Field(512, ge=1)  # prediction times per map_batches call on GPUs (split to fit memory)
    gpu_dtype: Literal["bfloat16", "float32"] = "bfloat16"  # the decoder's weights and KV cache on GPUs
    gpu_memory_fraction: float = Field(0.8, gt=0.0, le=1.0)  # of the free GPU memory a chunk may fill
    sync_every: int = Field(8, ge=1)  # decode steps between the sampler's host syncs (stop / compaction checks)
    seed: int = 0
    n_boot: int = Field(1000, ge=0)  # bootstrap resamples for the AUROC intervals


def target_token_ids(
    task: TaskDefinition, tokenizer: Tokenizer, codebook: CodeBook | None = None
) -> tuple[list[int], dict]:
    """The vocabulary ids of the task's target codes, and an account of the codes that have none.

    `codebook`: the data's concept id -> code mapping (its metadata/codes.parquet), so the targets
    are `SNOMED/44054006`-style codes when the data has them (the id form without a book).
    Measurement thresholds (HbA1c >= 6.5 %) are not single tokens, so they cannot be targets of a
    token sampler; they are counted, not silently used or dropped.
    """
    resolved = resolve_task(task, codebook=codebook).target
    codes = sorted({code for domain in CODE_DOMAINS for code in resolved.codes.get(domain, ())})
    ids = sorted({tokenizer.token_id[c] for c in codes if c in tokenizer.token_id})
    account = {
        "target_codes": len(codes),
        "in_vocabulary": sum(c in tokenizer.token_id for c in codes),
        "not_in_vocabulary": sum(c not in tokenizer.token_id for c in codes),
        "measurement_thresholds_ignored": len(resolved.thresholds),
    }
    if not ids:
        raise ValueError(
            f"task {task.name!r}: none of its {len(codes)} target codes is in the vocabulary "
            f"({tokenizer.vocab_size} tokens); zero-shot scoring needs at least one"
        )
    return ids, account


def gap_days_per_token(tokenizer: Tokenizer, gap_time: str = "lower") -> torch.Tensor:
    """[V] days each token moves the clock: a gap token's lower edge (or bucket midpoint), else 0."""
    edges = tokenizer.gap_edges_days
    days = torch.zeros(tokenizer.vocab_size, dtype=torch.float64)
    for i, name in enumerate(gap_token_names(edges)):
        lower = edges[i]
        upper = edges[i + 1] - 1 if i + 1 < len(edges) else lower  # the open last bucket: its lower edge
        days[tokenizer.token_id[name]] = lower if gap_time == "lower" else (lower + upper) // 2
    return days


def example_seed(seed: int, subject_id: int, prediction_time_us: int) -> int:
    """A 63-bit seed from (run seed, person, prediction time): the same example always draws alike."""
    digest = hashlib.blake2b(f"{seed}:{subject_id}:{prediction_time_us}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def prompts_per_chunk(
    cfg: ModelConfig,
    prompt_length: int,
    n_samples: int,
    max_new_tokens: int,
    free_bytes: int,
    dtype_bytes: int = 2,
) -> int:
    """How many prompts one sampler call can take within `free_bytes`: each prompt holds its
    keys/values once (prompt + PRS prefix), each of its continuations a preallocated suffix of
    `max_new_tokens` positions, and the call needs the prefill activations (about 6 hidden-wide and
    one MLP-wide tensor per prompt position, plus the attention scores) and per-continuation
    vocabulary-wide sampling buffers (about 8 float32/float64 arrays). An estimate with headroom."""
    positions = prompt_length + cfg.prefix_length
    kv_prompt = 2 * cfg.layers * positions * cfg.hidden * dtype_bytes
    kv_suffix = 2 * cfg.layers * max_new_tokens * cfg.hidden * dtype_bytes
    prefill = positions * (6 * cfg.hidden + int(cfg.mlp_ratio * cfg.hidden)) * 4 + cfg.heads * positions**2 * 4
    sampling = n_samples * cfg.vocab_size * 8 * 8 + n_samples * cfg.heads * positions * 4 * 3
    per_prompt = kv_prompt + n_samples * kv_suffix + prefill + sampling
    return max(1, int(free_bytes // per_prompt))


class ZeroShotScorer:
    """Ray Data callable class: loads the decoder once per actor, scores Arrow batches of examples.

    On a GPU actor (Ray assigned it one and `device` is not cpu) the decoder runs there in
    `gpu_dtype`, and each batch is split into chunks that fit the GPU's free memory; results do
    not depend on the chunking (each example has its own seed)."""

    def __init__(
        self, pretrained_dir: str, target_ids: list[int], gap_days: list[float], horizon_days: float, config: dict
    ):
        self.config = ZeroShotConfig.model_validate(config)
        torch.set_num_threads(self.config.torch_threads)
        self.model = load_model(pretrained_dir)
        self.device = torch.device("cpu")
        if self.config.device != "cpu" and torch.cuda.is_available():
            self.device = torch.device("cuda")
            self.model = self.model.to(self.device, dtype=getattr(torch, self.config.gpu_dtype))
        elif self.config.device == "cuda":
            raise RuntimeError("zero-shot device 'cuda' but this actor sees no GPU")
        self.model.eval()
        self.target_ids = list(target_ids)
        self.gap_days = torch.tensor(gap_days, dtype=torch.float64)
        self.horizon_days = float(horizon_days)
        self.persons, self.seconds = 0, 0.0

    def chunk_size(self, prompts: int, prompt_length: int) -> int:
        if self.device.type != "cuda":
            return prompts
        free, _ = torch.cuda.mem_get_info(self.device)
        dtype_bytes = torch.finfo(getattr(torch, self.config.gpu_dtype)).bits // 8
        budget = int(free * self.config.gpu_memory_fraction)
        cfg = self.config
        return prompts_per_chunk(self.model.cfg, prompt_length, cfg.n_samples, cfg.max_new_tokens, budget, dtype_bytes)

    def score(self, inputs: dict, seeds: list[int]) -> dict[str, torch.Tensor]:
        """share, path_probability, truncated [P] and generated tokens, chunk by chunk on the actor's device."""
        cfg, prompts = self.config, len(seeds)
        chunk = self.chunk_size(prompts, int(inputs["tokens"].shape[1]))
        parts = []
        for start in range(0, prompts, chunk):
            rows = slice(start, start + chunk)

            def on(t, rows=rows):
                return None if t is None else t[rows].to(self.device)

            result = sample_trajectories(
                self.model,
                on(inputs["tokens"]),
                on(inputs["ages"].long()),
                on(inputs["length"]),
                on(inputs["prs"]),
                on(inputs["has_prs"]),
                n_samples=cfg.n_samples,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                target_ids=self.target_ids,
                gap_days=self.gap_days,
                horizon_days=self.horizon_days,
                seeds=seeds[rows],
                sync_every=cfg.sync_every,
            )
            parts.append(
                {
                    "share": result.share.cpu(),
                    "path_probability": result.path_probability.cpu(),
                    "truncated": result.truncated.cpu(),
                    "generated": (result.tokens != PAD_ID).sum(dim=1).view(-1, cfg.n_samples).sum(dim=1).cpu(),
                }
            )
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        inputs = example_tensors(batch)
        times = pc.cast(batch["prediction_time"], pa.timestamp("us")).cast(pa.int64()).to_pylist()
        seeds = [example_seed(self.config.seed, sid, t) for sid, t in zip(batch["subject_id"].to_pylist(), times)]
        result = self.score(inputs, seeds)
        seconds = time.perf_counter() - started
        return pa.table(
            {
                "subject_id": batch["subject_id"],
                "prediction_time": batch["prediction_time"],
                "split": batch["split"],
                "label": batch["label"],
                "zs_share": pa.array(result["share"].numpy(), pa.float64()),
                "zs_path_probability": pa.array(result["path_probability"].numpy(), pa.float64()),
                "zs_truncated": pa.array(result["truncated"].numpy().astype(np.int32), pa.int32()),
                TOKENS_COLUMN: pa.array(result["generated"].numpy().astype(np.int64), pa.int64()),
                SECONDS_COLUMN: pa.array(np.full(batch.num_rows, seconds / max(batch.num_rows, 1)), pa.float64()),
                DEVICE_COLUMN: pa.array([self.device.type] * batch.num_rows, pa.string()),
                **({ROW_COLUMN: batch[ROW_COLUMN]} if ROW_COLUMN in batch.column_names else {}),
            }
        )


def scoring_inputs(
    pretrained_dir: str | Path, data_dir: str | Path, task: TaskDefinition, config: ZeroShotConfig
) -> tuple[list[int], torch.Tensor, float, dict]:
    """Target ids (+ their account), gap days and horizon for a checkpoint + data directory, checked against
    each other."""
    tokenizer = Tokenizer.load(Path(data_dir) / "tokenizer.json")
    model_cfg = load_model_config(pretrained_dir)
    if model_cfg.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"{pretrained_dir}: model vocabulary {model_cfg.vocab_size} != {data_dir}/tokenizer.json "
            f"({tokenizer.vocab_size} tokens): checkpoint and data come from different preprocessing"
        )
    target_ids, account = target_token_ids(task, tokenizer, dataset_codebook(data_dir))
    horizon = float(config.horizon_days or task.horizon_days)
    if not task.horizon_inclusive:
        horizon -= 0.5  # whole-day clock: an outcome exactly at the horizon is then outside
    return target_ids, gap_days_per_token(tokenizer, config.gap_time), horizon, account


def score_zero_shot(
    pretrained_dir: str | Path, data_dir: str | Path, labels: pa.Table, task: TaskDefinition, config: ZeroShotConfig
) -> pa.Table:
    """Zero-shot scores of every labelled example in `config.splits`, in example order (Ray Data).

    The schema metadata (ACCOUNT_KEY) holds how the target codes mapped to the vocabulary and the
    seconds spent building windows and sampling.
    """
    import ray

    started = time.perf_counter()
    target_ids, gap_days, horizon, account = scoring_inputs(pretrained_dir, data_dir, task, config)
    examples = build_examples(data_dir, labels, load_model_config(pretrained_dir).context)
    examples = examples.filter(pc.is_in(examples["split"], pa.array(config.splits, pa.string())))
    if examples.num_rows == 0:
        raise ValueError(f"no labelled examples in splits {config.splits} ({labels.num_rows} labels given)")
    windows_done = time.perf_counter()
    examples = examples.append_column(ROW_COLUMN, pa.array(np.arange(examples.num_rows), pa.int64()))
    placement = actor_placement(config, ray.cluster_resources().get("GPU", 0.0))
    batch_size = placement.pop("batch_size")
    blocks = [examples.slice(start, batch_size) for start in range(0, examples.num_rows, batch_size)]
    scored = ray.data.from_arrow(blocks).map_batches(  # one block per batch: every actor gets work
        ZeroShotScorer,
        fn_constructor_args=(str(pretrained_dir), target_ids, gap_days.tolist(), horizon, config.model_dump()),
        compute=ray.data.ActorPoolStrategy(size=placement.pop("concurrency")),
        batch_size=batch_size,
        batch_format="pyarrow",
        **placement,
    )
    out = pa.concat_tables(ray.get(scored.to_arrow_refs())).sort_by(ROW_COLUMN)
    if out.num_rows != examples.num_rows:
        raise RuntimeError(f"zero-shot scoring returned {out.num_rows} rows for {examples.num_rows} examples")
    sampling = time.perf_counter() - windows_done
    timing = {
        "window_seconds": round(windows_done - started, 2),
        "sampling_seconds": round(sampling, 2),
        **throughput(out, sampling, config),
    }
    log_throughput_to_mlflow(timing, config)
    out = out.drop_columns([ROW_COLUMN, TOKENS_COLUMN, SECONDS_COLUMN, DEVICE_COLUMN])
    return out.replace_schema_metadata({ACCOUNT_KEY: json.dumps({**account, **timing})})


def actor_placement(config: ZeroShotConfig, cluster_gpus: float) -> dict:
    """map_batches resources: GPU actors (num_gpus each, at most as many as the GPUs hold) with
    `gpu_batch_size` when the cluster has GPUs and `device` allows, else CPU actors."""
    use_gpu = config.device == "cuda" or (config.device == "auto" and cluster_gpus >= config.num_gpus)
    if config.device == "cuda" and cluster_gpus < config.num_gpus:
        raise ValueError(
            f"zero-shot device 'cuda' needs {config.num_gpus} GPU(s) per actor; the cluster has {cluster_gpus}"
        )
    if use_gpu:
        actors = max(1, min(config.concurrency, int(cluster_gpus // config.num_gpus)))
        return {
            "concurrency": actors,
            "num_gpus": config.num_gpus,
            "num_cpus": config.num_cpus,
            "batch_size": config.gpu_batch_size,
        }
    return {"concurrency": config.concurrency, "num_cpus": config.num_cpus, "batch_size": config.batch_size}


def throughput(scored: pa.Table, sampling_seconds: float, config: ZeroShotConfig) -> dict:
    """Persons (prediction times) and sampled tokens per second of the stage's sampling wall time, and
    per actor-second (the actors' own time in their calls, summed), and the devices used."""
    persons = scored.num_rows
    tokens = int(pc.sum(scored[TOKENS_COLUMN]).as_py() or 0)
    actor_seconds = float(pc.sum(scored[SECONDS_COLUMN]).as_py() or 0.0)
    return {
        "persons_per_s": round(persons / max(sampling_seconds, 1e-9), 3),
        "sampled_tokens_per_s": round(tokens / max(sampling_seconds, 1e-9), 1),
        "persons_per_actor_s": round(persons / max(actor_seconds, 1e-9), 3),
        "sampled_tokens": tokens,
        "devices": sorted(set(scored[DEVICE_COLUMN].to_pylist())),
    }


def log_throughput_to_mlflow(timing: dict, config: ZeroShotConfig) -> bool:
    """Throughput and sampler settings to MLflow when MLFLOW_TRACKING_URI is set; False otherwise."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return False
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    from ehrfm.tracking import use_experiment

    use_experiment(os.environ.get("EHRFM_ZERO_SHOT_EXPERIMENT", "ehrfm-zero-shot"))
    with mlflow.start_run(run_name="zero_shot"):
        mlflow.log_params({k: str(v)[:500] for k, v in config.model_dump().items()})
        mlflow.log_metrics({k: float(v) for k, v in timing.items() if isinstance(v, (int, float))})
        mlflow.set_tag("zero_shot_devices", ",".join(timing.get("devices", [])))
    return True


def summarize(scores: pa.Table, config: ZeroShotConfig) -> dict:
    """Counts, timing, truncation and AUROC (bootstrap CI) of both scores per split; no person-level values."""
    account = json.loads((scores.schema.metadata or {}).get(ACCOUNT_KEY, b"{}"))
    sampling = account.pop("sampling_seconds", float("nan"))
    per_example = round(sampling / max(scores.num_rows, 1), 4)
    summary = {
        "examples": scores.num_rows,
        "window_seconds": account.pop("window_seconds", float("nan")),
        "sampling_seconds": sampling,
        "sampling_seconds_per_example": per_example,
        "throughput": {k: account.pop(k) for k in THROUGHPUT_KEYS if k in account},
        "trajectories": scores.num_rows * config.n_samples,
        "truncated_trajectories": int(pc.sum(scores["zs_truncated"]).as_py() or 0),
        "target_codes": account,
        "config": config.model_dump(),
        "splits": {},
    }
    for split in config.splits:
        part = scores.filter(pc.equal(scores["split"], split))
        labels = part["label"].to_numpy(zero_copy_only=False).astype(bool)
        entry = {
            "examples": part.num_rows,
            "positives": int(labels.sum()),
            "truncated_trajectories": int(pc.sum(part["zs_truncated"]).as_py() or 0),
        }
        for column in SCORE_COLUMNS:
            if 0 < labels.sum() < len(labels):
                est = auroc_ci(labels, part[column].to_numpy(), n_boot=config.n_boot, seed=config.seed)
                entry[f"auroc_{column}"] = {"value": est.value, "lower": est.lower, "upper": est.upper}
            else:
                entry[f"auroc_{column}"] = None  # one class only: AUROC undefined
        summary["splits"][split] = entry
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ehrfm zero_shot", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pretrained",
        type=Path,
        required=True,
        help="pretraining run dir or checkpoint dir (model.pt + model_config.json)",
    )
    parser.add_argument("--data", type=Path, required=True, help="preprocessed dir (timelines/, tokenizer.json)")
    parser.add_argument("--labels", type=Path, required=True, help="labels.parquet from `ehrfm label`")
    parser.add_argument("--task", required=True, help="task name (t2d) or task YAML path")
    parser.add_argument("--out", type=Path, required=True)
    add_config_arguments(parser, "ZeroShotConfig")
    args = parser.parse_args(argv)
    config = parse_config(parser, ZeroShotConfig, args)
    task = load_task(args.task)
    import ray

    from ehrfm.transfer.finetune import resolve_pretrained

    args.pretrained = resolve_pretrained(args.pretrained)
    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS / a running cluster if there is one, else a local instance
    scores = score_zero_shot(args.pretrained, args.data, read_labels(args.labels), task, config)
    args.out.mkdir(parents=True, exist_ok=True)
    pq.write_table(scores, args.out / OUTPUT_FILE)
    summary = {"task": task.name, "pretrained": str(args.pretrained), **summarize(scores, config)}
    (args.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    shown = ("examples", "sampling_seconds_per_example", "trajectories", "truncated_trajectories", "splits")
    print(json.dumps({k: summary[k] for k in shown}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
