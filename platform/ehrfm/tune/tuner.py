"""The Ray Tune side of a sweep: the search algorithm, ASHA, the Tuner (new or restored), and what
each trial did once the Tuner returns."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ehrfm.tune.config import SweepConfig
from ehrfm.tune.trial import trial_dirname

METRIC = "val_auroc"  # reported by the Train workers after every epoch, with "epoch"
TUNE_DIR = "tune"  # the Tune experiment inside the sweep directory


def search_algorithm(kind: str, points: list[dict[str, Any]], seed: int):
    """(name, search algorithm): Optuna (TPE, seeded) unless `random` is asked for or Optuna is
    missing; both evaluate `points` first."""
    if kind != "random":
        try:
            import optuna  # noqa: F401
            from ray.tune.search.optuna import OptunaSearch

            return "optuna", OptunaSearch(points_to_evaluate=points or None, seed=seed)
        except ImportError:
            if kind == "optuna":
                raise
    from ray.tune.search import BasicVariantGenerator

    return "random", BasicVariantGenerator(points_to_evaluate=points or None, random_state=seed)


def build_tuner(sweep: SweepConfig, trainable, param_space: dict, search_alg, max_epochs: int, concurrency: int):
    """A new Tuner, or the stored one (space, searcher and scheduler state, finished trials) when
    the sweep's Tune experiment exists. ASHA's time axis is the reported epoch, so a trial resumed
    from a Train checkpoint keeps its place on the rungs."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    tune_dir = sweep.sweep_dir() / TUNE_DIR
    if tune.Tuner.can_restore(str(tune_dir)):
        print(f"sweep {sweep.name}: restoring {tune_dir} (finished trials are kept)", flush=True)
        return tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    scheduler = ASHAScheduler(
        time_attr="epoch",
        max_t=max_epochs,
        grace_period=sweep.scheduler.grace_period,
        reduction_factor=sweep.scheduler.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=sweep.num_samples,
            max_concurrent_trials=concurrency,
            trial_dirname_creator=trial_dirname,
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=str(sweep.sweep_dir()),
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=sweep.resources.max_failures),
        ),
    )


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def trial_summaries(grid, max_epochs: int) -> list[dict[str, Any]]:
    """Per trial, in trial-id order: id, searched values, epochs Tune saw, best val AUROC, outcome
    (completed | early_stopped | error)."""
    trials = []
    for result in grid:
        history = result.metrics_dataframe
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.removeprefix("trial_")
        has = history is not None and METRIC in history and "epoch" in history
        epochs = int(history["epoch"].max()) if has and history["epoch"].notna().any() else 0
        best = float(history[METRIC].max()) if has and history[METRIC].notna().any() else math.nan
        outcome = "error" if result.error else ("completed" if epochs >= max_epochs else "early_stopped")
        trials.append(
            {
                "trial_id": trial_id,
                "config": {k: _plain(v) for k, v in (result.config or {}).items()},
                "epochs": epochs,
                "best_val_auroc": best,
                "outcome": outcome,
            }
        )
    return sorted(trials, key=lambda t: t["trial_id"])
