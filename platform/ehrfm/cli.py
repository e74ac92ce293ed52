"""The `ehrfm` command: one subcommand per submittable job in `jobs/`.

Each subcommand is a `main(argv) -> int` in the module that owns the work; the table below maps
names to those functions and imports them lazily, so `ehrfm --help` does not import Ray or torch.
`jobs/<name>.py` calls `run_command(<name>, argv)`, so the job files and the CLI cannot drift.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# Kept equal to pyproject's [project] version (a unit test compares them); used when not installed.
_FALLBACK_VERSION = "0.1.0"

# subcommand -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synthesize": ("ehrfm_synthetic.cohort:main", "write a synthetic OMOP + PRS cohort with a known truth"),
    "validate": ("ehrfm.omop.validate:main", "validate OMOP tables and PRS files; quarantine bad rows"),
    "preprocess": ("ehrfm.preprocess.job:main", "OMOP + PRS -> MEDS events -> tokenized timelines on Ray Data"),
    "score_prs": ("ehrfm.genetics.score:main", "compute PRS from PLINK genotypes and PGS Catalog scoring files"),
    "pretrain": ("ehrfm.training.pretrain:main", "pretrain the decoder on Ray Train + DeepSpeed ZeRO"),
    "finetune": ("ehrfm.transfer.finetune:main", "fine-tune a risk head on a pretrained decoder (Ray Train)"),
    "tune": ("ehrfm.tune.sweep:main", "Ray Tune sweep of fine-tuning runs (ASHA, Optuna); registers the best trial"),
    "zero_shot": ("ehrfm.transfer.zero_shot:main", "zero-shot risk: sample futures from the pretrained decoder"),
    "label": ("ehrfm.tasks.labeler:main", "label prediction times for a task (MEDS label parquet)"),
    "baselines": ("ehrfm.evaluate.baselines:main", "PRS-only and count-feature baselines with bootstrap CIs"),
    "few_shot": (
        "ehrfm.evaluate.few_shot_job:main",
        "few-shot heads (k = 1..128 shots): frozen FM features vs count baselines, AUROC vs k",
    ),
    "prs_headroom": ("ehrfm.evaluate.prs_headroom:main", "how much the observed PRS could add to a task (CV, oracle)"),
    "evaluate": (
        "ehrfm.evaluate.run:main",
        "every model of a task on the same test rows: CIs, calibration, oracle, report",
    ),
    "register": (
        "ehrfm.mlops.register:main",
        "log a risk model to MLflow; alias champion only when it beats the current one",
    ),
    "cluster": ("ehrfm.cluster.cli:main", "start, stop or inspect a local multi-node Ray cluster"),
    "tracking": ("ehrfm.tracking:main", "start, reuse or check the local MLflow tracking server"),
    "serve": ("ehrfm.serve.app:main", "deploy the registered champion on Ray Serve (FastAPI, /v1/score, /docs)"),
    "pipeline": ("ehrfm.workflow:main", "the main job: every stage end to end on the embedded default"),
}


def run_command(name: str, argv: Sequence[str]) -> int:
    """Run subcommand `name` with `argv` (its own arguments, without the name)."""
    if name not in COMMANDS:
        raise SystemExit(f"ehrfm: unknown command {name!r}; choose from {', '.join(sorted(COMMANDS))}")
    target, _ = COMMANDS[name]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(list(argv))
    return int(result or 0)


def version() -> str:
    """The installed distribution's version; the source tree's pyproject value when not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("ehrfm")
    except PackageNotFoundError:
        return _FALLBACK_VERSION


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: ehrfm [--version] <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in sorted(COMMANDS.items())]
    lines += ["", "Run `ehrfm <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if args[0] in {"-V", "--version"}:
        print(f"ehrfm {version()}")
        return 0
    return run_command(args[0], args[1:])


if __name__ == "__main__":
    sys.exit(main())
