"""`ehrfm tune` / jobs/tune.py: a Ray Tune sweep whose trials are fine-tuning runs on Ray Train.

    python jobs/tune.py --task t2d --pretrained RUN --data PREPROCESSED --labels labels.parquet \
        --num-samples 8 [--config jobs/configs/tune-t2d.yaml] [--name NAME] [key=value | finetune.key=value ...]

The driver prepares the examples once (`prepare_finetune`), then a `Tuner` runs the trials (each
drives a `TorchTrainer`, see `ehrfm.tune.trial`), with ASHA stopping trials whose validation AUROC
lags at an epoch rung and Optuna proposing the points (Tune's random search when Optuna is not
installed). Trials run at most `max_concurrent_trials` at a time, derived from the cluster.

The sweep lives in <storage_path>/<name>/: tune/ (the Tune experiment), trials/<trial id>/ (each
trial's Train run), best/ (the winner: model/, predictions.parquet, finetune_result.json, the same
files as `ehrfm finetune` writes, so evaluate and register read them unchanged), sweep_config.json
and sweep_result.json. Starting the same name again restores the Tune experiment
(`Tuner.restore`): finished trials are kept, unfinished ones resume their Train runs from their
last epoch checkpoint. Only the best trial is scored on the test split, once, and it goes through
the registry rule (alias `champion` only when it beats the current champion on validation AUROC).

MLflow: the driver owns a parent run for the sweep; every trial logs into a child run (nested
under the parent) with its searched values as `hp.*` params and its per-epoch val_auroc.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from ehrfm.config import add_config_arguments, dump_config, flag_overrides, out_dir, usage_errors
from ehrfm.model.io import load_model_config
from ehrfm.paths import absolute_path
from ehrfm.transfer.finetune import PreparedData, artifact_root_for, prepare_finetune, tracking_uri_for
from ehrfm.transfer.finetune_config import FinetuneConfig
from ehrfm.tune.config import SweepConfig, check_or_record_config, load_sweep, sweep_points
from ehrfm.tune.resources import max_concurrent_trials
from ehrfm.tune.runs import close_child_runs, open_parent_run
from ehrfm.tune.search_space import tune_space
from ehrfm.tune.trial import SweepTrial, TrialContext
from ehrfm.tune.tuner import METRIC, build_tuner, search_algorithm, trial_summaries
from ehrfm.tune.winner import BEST_DIR, finalize_best, register_winner

TRIALS_DIR = "trials"
SWEEP_RESULT_FILE = "sweep_result.json"
DEFAULT_CONFIG = "jobs/configs/tune-t2d.yaml"


def resolve(sweep: SweepConfig, base: FinetuneConfig) -> tuple[SweepConfig, FinetuneConfig, PreparedData, list]:
    """Absolute sweep storage; the base fine-tune resolved (`prepare_finetune`: examples built once)
    with the sweep's epochs and experiment; the points to run first, checked against the space."""
    sweep = sweep.model_copy(deep=True)
    sweep.storage_path = absolute_path(sweep.storage_path)
    base = base.model_copy(deep=True)
    base.run.storage_path, base.run.name = str(sweep.sweep_dir()), BEST_DIR
    base.mlflow.experiment = sweep.experiment
    if sweep.scheduler.max_epochs:
        base.train.epochs = sweep.scheduler.max_epochs
    base, data = prepare_finetune(base)
    points = sweep_points(sweep, base, load_model_config(base.model.pretrained).fusion)
    return sweep, base, data, points


def sweep_trainable(context: TrialContext, data: PreparedData, driver_cpus: float):
    """The trial class with the shared context and the train/val examples (the test split never
    reaches a trial) put in the object store once, holding `driver_cpus` per trial."""
    from ray import tune

    trial_data = PreparedData(
        {s: data.examples[s] for s in ("train", "val")}, data.tokenizer, data.pgs_ids, data.tokenizer_version
    )
    return tune.with_resources(tune.with_parameters(SweepTrial, context=context, data=trial_data), {"CPU": driver_cpus})


def log_sweep_outcome(parent, result: dict, summary: dict) -> None:
    """Children closed (outcome, best val AUROC, KILLED when stopped); the parent gets the winner."""
    trials = result["trials"]
    close_child_runs(parent, trials)
    outcomes = [t["outcome"] for t in trials]
    parent.log_metrics(
        {
            "best_val_auroc": result["best_val_auroc"],
            **{f"best_{k}": v for k, v in summary["metrics"].items()},
            "trials": len(trials),
            "trials_early_stopped": outcomes.count("early_stopped"),
            "trials_errored": outcomes.count("error"),
        },
        len(trials),
    )
    parent.client.set_tag(parent.run_id, "ehrfm.tune.best_trial_id", result["best_trial_id"])
    parent.log_params({f"best.{k}": v for k, v in result["best_config"].items()})
    parent.log_text(json.dumps(result, indent=2, default=str), SWEEP_RESULT_FILE)


def run_sweep(sweep: SweepConfig, base: FinetuneConfig) -> dict[str, Any]:
    """Run (or resume) the sweep on the connected Ray cluster; returns the summary also written to
    <sweep>/sweep_result.json: best_config, best_val_auroc, test_auroc of the best trial, registry
    outcome (None when registration is off), every trial's outcome, the default trial's."""
    import ray

    sweep, base, data, points = resolve(sweep, base)
    sweep_dir = sweep.sweep_dir()
    resuming = check_or_record_config(sweep_dir, sweep, base)
    search_name, search_alg = search_algorithm(sweep.search, points, sweep.seed)
    concurrency = sweep.resources.max_concurrent_trials or max_concurrent_trials(
        ray.cluster_resources(), base.scaling, sweep.resources.driver_cpus, sweep.resources.headroom_cpus
    )
    base.mlflow.tracking_uri = tracking_uri = tracking_uri_for(base)
    parent = None
    if tracking_uri:
        parent = open_parent_run(
            tracking_uri,
            sweep.experiment,
            str(sweep_dir),
            sweep.name,
            artifact_root_for(base),
            {
                "task": base.task,
                "sweep.num_samples": sweep.num_samples,
                "sweep.search": search_name,
                "sweep.metric": METRIC,
                "sweep.max_epochs": base.train.epochs,
                "sweep.grace_period": sweep.scheduler.grace_period,
                "sweep.reduction_factor": sweep.scheduler.reduction_factor,
                "sweep.max_concurrent_trials": concurrency,
                "sweep.points_evaluated_first": len(points),
            },
        )
        if not parent.resumed:
            parent.log_text(dump_config(sweep), "sweep_config.yaml")
    context = TrialContext(
        base=base.model_dump(mode="json"),
        trials_dir=str(sweep_dir / TRIALS_DIR),
        sweep_name=sweep.name,
        parent_run_id=parent.run_id if parent else None,
        artifact_root=artifact_root_for(base),
    )
    print(
        f"sweep {sweep.name}: {sweep.num_samples} trials, {search_name} search, ASHA on {METRIC} over "
        f"{base.train.epochs} epochs, at most {concurrency} at a time{' (resuming)' if resuming else ''}",
        flush=True,
    )
    result_path = sweep_dir / SWEEP_RESULT_FILE
    try:
        trainable = sweep_trainable(context, data, sweep.resources.driver_cpus)
        grid = build_tuner(sweep, trainable, tune_space(sweep.space), search_alg, base.train.epochs, concurrency).fit()
        trials = trial_summaries(grid, base.train.epochs)
        ranked = [t for t in trials if math.isfinite(t["best_val_auroc"])]
        if not ranked:
            raise RuntimeError(
                f"sweep {sweep.name}: no trial reported {METRIC} "
                f"({'; '.join(t['trial_id'] + ': ' + t['outcome'] for t in trials)})"
            )
        best = max(ranked, key=lambda t: t["best_val_auroc"])
        previous = json.loads(result_path.read_text()) if result_path.is_file() else {}
        if previous.get("best_trial_id") == best["trial_id"] and len(previous.get("trials", [])) == len(trials):
            print(f"sweep {sweep.name}: already finished and finalized ({result_path})", flush=True)
            if parent:
                parent.finish("FINISHED")
            return previous
        summary = finalize_best(sweep_dir, context, best, data)
        registry = None
        if parent and sweep.registry.enabled:
            registry = register_winner(summary, data, base.task, tracking_uri, parent.run_id, sweep.registry.n_boot)
        result = {
            "name": sweep.name,
            "sweep_dir": str(sweep_dir),
            "search": search_name,
            "max_concurrent_trials": concurrency,
            "max_epochs": base.train.epochs,
            "best_trial_id": best["trial_id"],
            "best_config": best["config"],
            "best_val_auroc": best["best_val_auroc"],
            "metrics": summary["metrics"],
            "test_auroc": summary["metrics"]["test_auroc"],
            "model_dir": summary["model_dir"],
            "best_dir": summary["run_dir"],
            "default_trial": next((t for t in trials if sweep.include_default and t["config"] == points[0]), None),
            "trials": trials,
            "registry": registry,
            "tracking_uri": tracking_uri,
            "parent_run_id": parent.run_id if parent else None,
        }
        if parent:
            log_sweep_outcome(parent, result, summary)
            parent.finish("FINISHED")
    except BaseException:
        if parent:
            parent.finish("FAILED")
        raise
    result_path.write_text(json.dumps(result, indent=2, default=str))
    return result


# the command's flags as config paths; finetune.* is the base fine-tune config
FLAGS = {
    "task": "finetune.task",
    "pretrained": "finetune.model.pretrained",
    "data": "finetune.data.dir",
    "labels": "finetune.data.labels",
    "num_samples": "num_samples",
    "name": "name",
    "storage": "storage_path",
    "out": out_dir("storage_path", "name"),
    "max_concurrent_trials": "resources.max_concurrent_trials",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ehrfm tune", description=__doc__.splitlines()[0])
    add_config_arguments(
        parser, "sweep (SweepConfig; finetune.key.path for the base FinetuneConfig)", default=DEFAULT_CONFIG
    )
    parser.add_argument("--task", help="task name or YAML (the base fine-tune's task)")
    parser.add_argument("--pretrained", help="pretraining run dir or checkpoint dir")
    parser.add_argument("--data", help="preprocessed dir holding timelines/")
    parser.add_argument("--labels", help="label parquet; absent: label <data>/events with the task")
    parser.add_argument("--num-samples", type=int, help="number of trials")
    parser.add_argument("--name", help="sweep name; the same name resumes an interrupted sweep")
    parser.add_argument("--storage", help="directory holding the sweep (storage_path)")
    parser.add_argument("--out", help="the sweep's own directory (sets --storage and --name)")
    parser.add_argument("--max-concurrent-trials", type=int, help="default: from the cluster")
    args = parser.parse_args(argv)
    with usage_errors(parser):
        sweep, base = load_sweep(args.config, [*args.overrides, *flag_overrides(args, FLAGS)])
    import ray

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS / the running cluster of `ray job submit`, else a local instance
    result = run_sweep(sweep, base)
    keys = ("sweep_dir", "best_trial_id", "best_config", "best_val_auroc", "test_auroc", "model_dir", "registry")
    print(json.dumps({k: result[k] for k in keys}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
