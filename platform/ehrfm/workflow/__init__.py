"""The main job: every stage end to end on the embedded default (what `make run` calls).

Each stage is one of the `ehrfm` commands, run in-process with its own arguments and writing its
own output directory under the work dir, as ../docs/ARCHITECTURE.md lays out. A stage is skipped
when its output exists and was made from the same inputs: a fingerprint of the stage's arguments,
the *contents* of every config file they name, the outputs of the stages it reads and the package
version (`workflow.fingerprint`), stored in `<output>/_stage.json` once the stage has finished.
`--from STAGE` forces that stage and everything after it. What the job prints (one line per
outcome, stage logs in `<workdir>/logs/` when stdout is not a terminal, a summary table at the
end) is `workflow.console`.
"""

from __future__ import annotations

import argparse
import json
import os
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
from ehrfm.workflow.console import Console, StageOutcome, quiet_environment, summary_table
from ehrfm.workflow.fingerprint import output_manifest, package_version, stage_fingerprint

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
    return ["--events", str(workdir / "preprocessed"), "--task", cfg.task, "--out", str(workdir / "labels")]


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


def stage_inputs(stage: Stage, records: dict[str, dict]) -> dict[str, str]:
    """{upstream stage: its fingerprint and the manifest of its finished output}."""
    return {name: f"{records[name]['fingerprint']}:{records[name].get('manifest', '')}" for name in stage.upstream}


def read_stage_record(output: Path) -> dict | None:
    path = output / STAGE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a damaged record: the stage runs again


def is_current(record: dict | None, fingerprint: str, output: Path) -> bool:
    """The recorded output was made from these inputs and is still what the stage left (a file
    deleted or rewritten since makes the stage due again)."""
    if record is None or record.get("fingerprint") != fingerprint:
        return False
    return record.get("manifest") == output_manifest(output, exclude=[STAGE_FILE])


def stage_plan(cfg: PipelineConfig, workdir: Path, start_from: str | None = None) -> dict[str, str]:
    """{stage: "due" | "up to date" | "disabled"} without running anything, assuming due stages
    would finish (their downstream is then due too): what `run_pipeline` would do now."""
    plan: dict[str, str] = {}
    records: dict[str, dict] = {}
    forced = False
    for stage in STAGES:
        forced = forced or stage.name == start_from
        if not stage.enabled(cfg):
            plan[stage.name], records[stage.name] = "disabled", {"fingerprint": "disabled"}
            continue
        print_, _ = stage_fingerprint(stage.name, stage.arguments(cfg, workdir), stage_inputs(stage, records))
        record = read_stage_record(workdir / stage.output)
        upstream_due = any(plan[name] == "due" for name in stage.upstream)
        current = not forced and not upstream_due and is_current(record, print_, workdir / stage.output)
        plan[stage.name] = "up to date" if current else "due"
        records[stage.name] = record if current else {"fingerprint": print_, "manifest": "pending"}
    return plan


class StageFailed(SystemExit):
    """A stage failed; the summary has been printed and names the error."""


def run_pipeline(
    cfg: PipelineConfig,
    workdir: Path,
    start_from: str | None = None,
    until: str | None = None,
    console: Console | None = None,
    runner: Callable[[str, list[str]], int] = run_command,
    epilogue: Callable[[dict[str, dict]], None] | None = None,
) -> dict[str, dict]:
    """Run (or skip) each stage in order; returns {stage: record}. Prints the summary table last,
    also when a stage fails (then raises StageFailed, its message the error line); `epilogue`
    prints what comes before it after a run that finished (the evaluation report)."""
    workdir.mkdir(parents=True, exist_ok=True)
    console = console or Console(workdir)
    forced = False
    records: dict[str, dict] = {}
    outcomes = {s.name: StageOutcome(s.name, "not run", output=str(workdir / s.output)) for s in STAGES}
    selected = STAGES[: STAGE_NAMES.index(until) + 1] if until else STAGES
    failure: StageOutcome | None = None
    try:
        for index, stage in enumerate(selected, start=1):
            forced = forced or stage.name == start_from
            failure = _run_stage(cfg, workdir, stage, index, forced, records, console, runner)
            outcomes[stage.name] = failure or _outcome(stage, records[stage.name], workdir)
            if failure is not None:
                break
        if failure is None and epilogue is not None:
            epilogue(records)
    finally:
        console.line(summary_table([outcomes[s.name] for s in selected]))
    if failure is not None:
        raise StageFailed(f"stage {failure.stage} failed: {failure.error}")
    return records


def _outcome(stage: Stage, record: dict, workdir: Path) -> StageOutcome:
    if record["fingerprint"] == "disabled":
        return StageOutcome(stage.name, "disabled")
    status = "skipped" if record.get("skipped") else "ran"
    return StageOutcome(stage.name, status, record.get("seconds"), str(workdir / stage.output))


def _run_stage(
    cfg: PipelineConfig,
    workdir: Path,
    stage: Stage,
    index: int,
    forced: bool,
    records: dict[str, dict],
    console: Console,
    runner: Callable[[str, list[str]], int],
) -> StageOutcome | None:
    """Run or skip one stage, recording it in `records`; a StageOutcome when it failed."""
    header = f"[{index}/{len(STAGES)}] {stage.name}"
    if not stage.enabled(cfg):
        records[stage.name] = {"stage": stage.name, "fingerprint": "disabled"}
        return None
    output = workdir / stage.output
    args = stage.arguments(cfg, workdir)
    print_, configs = stage_fingerprint(stage.name, args, stage_inputs(stage, records))
    record = read_stage_record(output)
    if not forced and is_current(record, print_, output):
        console.line(f"{header}: up to date, skipped ({output})")
        records[stage.name] = {**record, "skipped": True}
        return None
    log = f" (log: {console.log_path(stage.name)})" if console.capture else ""
    console.line(f"{header}: running -> {output}{log}")
    # outputs of other inputs go; an unfinished output (no record) stays, so a stage that
    # resumes (pretraining checkpoints) picks up where a killed run stopped
    if output.exists() and (forced or record is not None):
        shutil.rmtree(output)
    started = time.perf_counter()
    error: BaseException | None = None
    code = 1
    try:
        with console.stage_output(stage.name, header):
            code = runner(stage.command, args)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a stage's SystemExit or error ends the job with a summary
        error = exc
        code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 1
    seconds = round(time.perf_counter() - started, 2)
    if error is not None or code != 0:
        message = console.tail_error(stage.name, error) or f"exit code {code}"
        console.line(f"{header}: FAILED after {seconds:.1f}s: {message}", fresh=True)
        return StageOutcome(stage.name, "failed", seconds, str(output), message)
    output.mkdir(parents=True, exist_ok=True)  # commands with nothing to write (serve) still get a record
    record = {
        "stage": stage.name,
        "fingerprint": print_,
        "configs": configs,
        "version": package_version(),
        "seconds": seconds,
        "manifest": output_manifest(output, exclude=[STAGE_FILE]),
    }
    (output / STAGE_FILE).write_text(json.dumps(record, indent=2))
    console.line(f"{header}: done in {seconds:.1f}s", fresh=True)
    records[stage.name] = record
    return None


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
    console = Console(args.workdir)
    if console.capture:
        quiet_environment()  # before any stage starts Ray, whose processes inherit it
    if not os.environ.get("RAY_ADDRESS"):  # the local cluster a stage starts gets `ehrfm serve`'s ingress
        from ehrfm.serve.ingress import use_ingress

        use_ingress()
    # one tracking server for every stage: $MLFLOW_TRACKING_URI, else the local one (started or reused)
    console.line(f"MLflow tracking at {ensure_tracking_uri()}")

    def epilogue(records: dict[str, dict]) -> None:
        print_final_report(args.workdir, records, console)
        console.line(f"pipeline finished in {time.perf_counter() - started:.1f}s; outputs under {args.workdir}")

    try:
        run_pipeline(cfg, args.workdir, args.start_from, args.until, console=console, epilogue=epilogue)
    except StageFailed:
        return 1  # the summary, the error its last line, is already out
    return 0


def print_final_report(workdir: Path, records: dict[str, dict], console: Console) -> None:
    """The evaluation table and the registry outcome, when those stages ran."""
    report = workdir / "evaluation" / "report.md"
    if "evaluate" in records and report.is_file():
        console.line("\n" + report.read_text(encoding="utf-8"))
    registered = workdir / "registry" / "registered.json"
    if "register" in records and registered.is_file():
        outcome = json.loads(registered.read_text())
        console.line(
            f"registry: {outcome['name']} version {outcome['version']} "
            f"({outcome['metric_name']} {outcome['metric']:.3f}); champion is version "
            f"{outcome['champion_version']} ({outcome['reason']})"
        )


if __name__ == "__main__":
    sys.exit(main())
