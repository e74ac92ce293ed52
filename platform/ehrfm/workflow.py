"""The main job: every stage end to end on the embedded default (what `make run` calls).

Each stage is one of the `ehrfm` commands, run in-process with its own arguments and writing its
own output directory under the work dir, as ../docs/ARCHITECTURE.md lays out. A stage is skipped
when its output exists and was made from the same inputs: a fingerprint of the stage's arguments
and of the fingerprints of the stages it reads, stored in `<output>/_stage.json` once the stage
has finished. `--from STAGE` forces that stage and everything after it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from ehrfm.cli import run_command
from ehrfm.config import StrictModel, add_config_arguments, parse_config
from ehrfm.tracking import ensure_tracking_uri

STAGE_FILE = "_stage.json"


class PipelineConfig(StrictModel):
    """Sizes and seeds of the embedded default; jobs/configs/pipeline-demo.yaml sets them."""

    persons: int = 2000
    seed: int = 0
    num_pgs: int = 128
    genotyped_fraction: float = 0.6
    # "genotypes": the cohort carries PLINK genotypes + scoring files and the score_prs stage
    # computes the PRS from them (the path a biobank without precomputed scores takes)
    prs_source: Literal["scores", "genotypes"] = "scores"
    pretrain_config: str = "jobs/configs/pretrain-cpu-small.yaml"
    pretrain_overrides: list[str] = []  # key.path=value for the pretraining config, e.g. schedule.max_steps=30
    task: str = "t2d"  # shipped task name (jobs/configs/tasks/) or a task YAML
    finetune_config: str = "jobs/configs/finetune-t2d.yaml"
    finetune_overrides: list[str] = []
    zero_shot_config: str = "jobs/configs/zero-shot-t2d.yaml"
    zero_shot_overrides: list[str] = []
    # a small Ray Tune sweep of the fine-tune; its winner is what evaluate reports and register
    # registers (the default fine-tune is its first trial and is reported beside it)
    tune_config: str = "jobs/configs/tune-t2d.yaml"
    tune_samples: int = Field(3, ge=1)
    tune_overrides: list[str] = ["scheduler.max_epochs=3"]  # sweep keys; finetune.key.path=value for the base
    n_boot: int = 1000  # bootstrap resamples behind every confidence interval
    serve_port: int = 8000  # loopback port of the Serve smoke test that ends the job
    serve_smoke_persons: int = 5


@dataclass(frozen=True)
class Stage:
    """A pipeline step: the command it runs, the stages it reads and the directory it writes."""

    name: str
    command: str
    output: str  # relative to the work dir
    upstream: tuple[str, ...]
    arguments: Callable[[PipelineConfig, Path], list[str]]
    enabled: Callable[[PipelineConfig], bool] = lambda cfg: True


def _synthesize_args(cfg: PipelineConfig, workdir: Path) -> list[str]:
    return [
        "--persons",
        str(cfg.persons),
        "--seed",
        str(cfg.seed),
        "--num-pgs",
        str(cfg.num_pgs),
        "--genotyped-fraction",
        str(cfg.genotyped_fraction),
        "--prs-source",
        cfg.prs_source,
        "--out",
        str(workdir / "cohort"),
    ]


def _prs_file(cfg: PipelineConfig, workdir: Path) -> Path:
    if cfg.prs_source == "genotypes":
        return workdir / "prs_computed" / "aggregated_scores.txt.gz"
    return workdir / "cohort" / "prs" / "aggregated_scores.txt.gz"


def _score_prs_args(cfg: PipelineConfig, workdir: Path) -> list[str]:
    genotypes = workdir / "cohort" / "genotypes"
    return [
        "--genotypes",
        str(genotypes / "cohort"),
        "--scores",
        str(genotypes / "scores"),
        "--build",
        "GRCh38",
        "--denominator",
        "shared",
        "--out",
        str(workdir / "prs_computed"),
    ]


def _validate_args(cfg: PipelineConfig, workdir: Path) -> list[str]:
    cohort = workdir / "cohort"
    return [
        "--omop",
        str(cohort / "omop"),
        "--prs",
        str(_prs_file(cfg, workdir)),
        "--sample-map",
        str(cohort / "prs" / "sample_map.tsv"),
        "--out",
        str(workdir / "validation"),
    ]


def _preprocess_args(cfg: PipelineConfig, workdir: Path) -> list[str]:
    prs = workdir / "cohort" / "prs"
    return [
        "--omop",
        str(workdir / "cohort" / "omop"),
        "--prs",
        str(_prs_file(cfg, workdir)),
        "--sample-map",
        str(prs / "sample_map.tsv"),
        "--pcs",
        str(prs / "pcs.tsv"),
        "--out",
        str(workdir / "preprocessed"),
    ]


def _pretrain_args(cfg: PipelineConfig, workdir: Path) -> list[str]:
    # storage and run name live inside the stage's output, so a forced re-run starts fresh and a
    # killed one resumes from its last checkpoint when the same pipeline is started again
    return [
        "--config",
        cfg.pretrain_config,
        "--data",
        str((workdir / "preprocessed").resolve()),
        "--storage",
        str((workdir / "pretrain").resolve()),
        "--name",
        "pretrain",
        *cfg.pretrain_overrides,
    ]


def _label_args(cfg: PipelineConfig, workdir: Path) -> list[str]:
    return ["--events", str(workdir / "preprocessed" / "events"), "--task", cfg.task, "--out", str(workdir / "labels")]


def _labels_file(workdir: Path) -> str:
    return str((workdir / "labels" / "labels.parquet").resolve())


def _finetune_args(cfg: PipelineConfig, workdir: Path) -> list[str]:
    return [
        "--config",
        cfg.finetune_config,
        "--task",
        cfg.task,
        "--pretrained",
        str((workdir / "pretrain" / "pretrain").resolve()),
        "--data",
        str((workdir / "preprocessed").resolve()),
        "--labels",
        _labels_file(workdir),
        "--out",
        str((workdir / "finetune").resolve()),
        *cfg.finetune_overrides,
    ]


def _zero_shot_args(cfg: PipelineConfig, workdir: Path) -> list[str]:
    return [
        "--config",
        cfg.zero_shot_config,
        "--task",
        cfg.task,
        "--pretrained",
        str((workdir / "pretrain" / "pretrain").resolve()),
        "--data",
        str(workdir / "preprocessed"),
        "--labels",
        _labels_file(workdir),
        "--out",
        str(workdir / "zero_shot"),
        *cfg.zero_shot_overrides,
    ]


def _tune_args(cfg: PipelineConfig, workdir: Path) -> list[str]:
    # the sweep's base fine-tune is the pipeline's own (same config and overrides), so its first
    # trial is the default fine-tune; registration waits for the evaluation (register stage)
    return [
        "--config",
        cfg.tune_config,
        "--task",
        cfg.task,
        "--pretrained",
        str((workdir / "pretrain" / "pretrain").resolve()),
        "--data",
        str((workdir / "preprocessed").resolve()),
        "--labels",
        _labels_file(workdir),
        "--num-samples",
        str(cfg.tune_samples),
        "--out",
        str((workdir / "tune").resolve()),
        f"finetune_config={cfg.finetune_config}",
        "registry.enabled=false",
        *[f"finetune.{o}" for o in cfg.finetune_overrides],
        *cfg.tune_overrides,
    ]


def _champion_candidate(workdir: Path) -> Path:
    """The sweep's winner: what the evaluation headlines and the registry rule is given."""
    return workdir / "tune" / "best"


def _evaluate_args(cfg: PipelineConfig, workdir: Path) -> list[str]:
    return [
        "--data",
        str(workdir / "preprocessed"),
        "--labels",
        _labels_file(workdir),
        "--predictions",
        str(_champion_candidate(workdir) / "predictions.parquet"),
        "--default-predictions",
        str(workdir / "finetune" / "predictions.parquet"),
        "--zero-shot",
        str(workdir / "zero_shot" / "zero_shot.parquet"),
        "--n-boot",
        str(cfg.n_boot),
        "--recalibrate",
        "platt",
        "--out",
        str(workdir / "evaluation"),
        # the simulator's oracle is the T2D one
        *(["--cohort", str(workdir / "cohort")] if cfg.task == "t2d" else []),
    ]


def _register_args(cfg: PipelineConfig, workdir: Path) -> list[str]:
    return [
        "--finetune",
        str(_champion_candidate(workdir)),
        "--evaluation",
        str(workdir / "evaluation"),
        "--out",
        str(workdir / "registry"),
    ]


def _serve_args(cfg: PipelineConfig, workdir: Path) -> list[str]:
    # deploys the champion, scores made-up persons over HTTP, checks them against the registered
    # model's own predictions, and shuts Serve down again
    task = Path(cfg.task).stem if cfg.task.endswith((".yaml", ".yml")) else cfg.task
    return [
        "--model",
        f"ehrfm-{task}",
        "--alias",
        "champion",
        "--port",
        str(cfg.serve_port),
        "--smoke",
        str(cfg.serve_smoke_persons),
    ]


STAGES: tuple[Stage, ...] = (
    Stage("synthesize", "synthesize", "cohort", (), _synthesize_args),
    Stage(
        "score_prs",
        "score_prs",
        "prs_computed",
        ("synthesize",),
        _score_prs_args,
        enabled=lambda cfg: cfg.prs_source == "genotypes",
    ),
    Stage("validate", "validate", "validation", ("synthesize", "score_prs"), _validate_args),
    Stage("preprocess", "preprocess", "preprocessed", ("synthesize", "score_prs"), _preprocess_args),
    Stage("pretrain", "pretrain", "pretrain", ("preprocess",), _pretrain_args),
    Stage("label", "label", "labels", ("preprocess",), _label_args),
    Stage("finetune", "finetune", "finetune", ("pretrain", "label"), _finetune_args),
    Stage("zero_shot", "zero_shot", "zero_shot", ("pretrain", "label"), _zero_shot_args),
    Stage("tune", "tune", "tune", ("pretrain", "label"), _tune_args),
    Stage("evaluate", "evaluate", "evaluation", ("finetune", "zero_shot", "tune"), _evaluate_args),
    Stage("register", "register", "registry", ("tune", "evaluate"), _register_args),
    Stage("serve", "serve", "serving", ("register",), _serve_args),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def fingerprint(stage: Stage, args: list[str], upstream_prints: list[str]) -> str:
    payload = json.dumps({"stage": stage.name, "args": args, "upstream": upstream_prints})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_stage_record(output: Path) -> dict | None:
    path = output / STAGE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def run_pipeline(
    cfg: PipelineConfig, workdir: Path, start_from: str | None = None, until: str | None = None
) -> dict[str, dict]:
    """Run (or skip) each stage in order; returns {stage: record}."""
    workdir.mkdir(parents=True, exist_ok=True)
    forced = False
    records: dict[str, dict] = {}
    for index, stage in enumerate(STAGES, start=1):
        forced = forced or stage.name == start_from
        if not stage.enabled(cfg):
            records[stage.name] = {"stage": stage.name, "fingerprint": "disabled"}
            if stage.name == until:
                break
            continue
        output = workdir / stage.output
        args = stage.arguments(cfg, workdir)
        print_ = fingerprint(stage, args, [records[name]["fingerprint"] for name in stage.upstream])
        record = read_stage_record(output)
        header = f"[{index}/{len(STAGES)}] {stage.name}"
        if not forced and record is not None and record.get("fingerprint") == print_:
            print(f"{header}: up to date, skipped ({output})", flush=True)
            records[stage.name] = record
        else:
            print(f"{header}: running -> {output}", flush=True)
            # outputs of other inputs go; an unfinished output (no record) stays, so a stage that
            # resumes (pretraining checkpoints) picks up where a killed run stopped
            if output.exists() and (forced or record is not None):
                shutil.rmtree(output)
            started = time.perf_counter()
            code = run_command(stage.command, args)
            if code != 0:
                raise SystemExit(f"stage {stage.name} failed with exit code {code}")
            record = {"stage": stage.name, "fingerprint": print_, "seconds": round(time.perf_counter() - started, 2)}
            output.mkdir(parents=True, exist_ok=True)  # commands with nothing to write (serve) still get a record
            (output / STAGE_FILE).write_text(json.dumps(record, indent=2))
            print(f"{header}: done in {record['seconds']:.1f}s", flush=True)
            records[stage.name] = record
        if stage.name == until:
            break
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ehrfm pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    add_config_arguments(parser, "pipeline (PipelineConfig)")
    parser.add_argument(
        "--from", dest="start_from", choices=STAGE_NAMES, default=None, help="force this stage and every later one"
    )
    parser.add_argument("--until", choices=STAGE_NAMES, default=None, help="stop after this stage")
    args = parser.parse_args(argv)
    cfg = parse_config(parser, PipelineConfig, args)
    started = time.perf_counter()
    # one tracking server for every stage: $MLFLOW_TRACKING_URI, else the local one (started or reused)
    print(f"MLflow tracking at {ensure_tracking_uri()}", flush=True)
    records = run_pipeline(cfg, args.workdir, args.start_from, args.until)
    print_final_report(args.workdir, records)
    print(f"pipeline finished in {time.perf_counter() - started:.1f}s; outputs under {args.workdir}")
    return 0


def print_final_report(workdir: Path, records: dict[str, dict]) -> None:
    """The evaluation table and the registry outcome, when those stages ran."""
    report = workdir / "evaluation" / "report.md"
    if "evaluate" in records and report.is_file():
        print("\n" + report.read_text(encoding="utf-8"), flush=True)
    registered = workdir / "registry" / "registered.json"
    if "register" in records and registered.is_file():
        outcome = json.loads(registered.read_text())
        print(
            f"registry: {outcome['name']} version {outcome['version']} "
            f"({outcome['metric_name']} {outcome['metric']:.3f}); champion is version "
            f"{outcome['champion_version']} ({outcome['reason']})",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
