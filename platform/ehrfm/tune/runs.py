"""MLflow runs of a sweep: one parent run (owned by the sweep driver) and one child run per trial.

Runs are found again by their directory (`RunLogger`'s `ehrfm.run_dir` tag), so a restored sweep
logs into the same parent and a resumed trial into the same child. A child is created by the
trial before its Train run starts, with `mlflow.parentRunId` set, and rank 0 of the Train run then
finds it and logs the per-epoch validation AUROC into it. The searched values go to the child as
`hp.<key>` params (the columns of the MLflow parallel-coordinates view). Aggregates only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ehrfm.training.run_logger import RunLogger

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag: the UI shows children under the parent
SWEEP_TAG = "ehrfm.sweep"
TRIAL_TAG = "ehrfm.tune.trial_id"
OUTCOME_TAG = "ehrfm.tune.outcome"  # completed | early_stopped | error
HP_PREFIX = "hp."


def open_parent_run(
    tracking_uri: str, experiment: str, sweep_dir: str, name: str, artifact_root: str | None, params: Mapping[str, Any]
) -> RunLogger:
    logger = RunLogger(tracking_uri, experiment, sweep_dir, name, artifact_root)
    logger.client.set_tag(logger.run_id, SWEEP_TAG, name)
    logger.log_params(dict(params))
    return logger


def open_child_run(
    tracking_uri: str,
    experiment: str,
    trial_run_dir: str,
    trial_id: str,
    sweep_name: str,
    parent_run_id: str,
    artifact_root: str | None,
    point: Mapping[str, Any],
) -> RunLogger:
    logger = RunLogger(tracking_uri, experiment, trial_run_dir, f"{sweep_name}-{trial_id}", artifact_root)
    for key, value in ((PARENT_TAG, parent_run_id), (SWEEP_TAG, sweep_name), (TRIAL_TAG, trial_id)):
        logger.client.set_tag(logger.run_id, key, value)
    logger.log_params({f"{HP_PREFIX}{key}": value for key, value in point.items()})
    return logger


def child_runs(parent: RunLogger) -> dict[str, Any]:
    """trial id -> child run (mlflow Run) of the parent."""
    experiment_id = parent.client.get_run(parent.run_id).info.experiment_id
    runs = parent.client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.run_id}'", max_results=10_000
    )
    return {run.data.tags[TRIAL_TAG]: run for run in runs if TRIAL_TAG in run.data.tags}


def close_child_runs(parent: RunLogger, trials: list[dict]) -> None:
    """Outcome tag, best validation AUROC and epochs run (as Tune saw them) on every child. A child
    stopped by ASHA is marked KILLED; its curve may hold an epoch or two past the stop, which the
    Train workers finished while the abort reached them."""
    import math
    import time

    from mlflow.entities import Metric

    client, now = parent.client, int(time.time() * 1000)
    children = child_runs(parent)
    for trial in trials:
        run = children.get(trial["trial_id"])
        if run is None:
            continue
        client.set_tag(run.info.run_id, OUTCOME_TAG, trial["outcome"])
        values = {"best_val_auroc": trial["best_val_auroc"], "epochs_run": float(trial["epochs"])}
        metrics = [Metric(k, float(v), now, int(trial["epochs"])) for k, v in values.items() if math.isfinite(v)]
        if metrics:
            client.log_batch(run.info.run_id, metrics=metrics)
        if trial["outcome"] == "early_stopped":
            client.set_terminated(run.info.run_id, status="KILLED")  # even if its Train run got to finish
        elif run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="FINISHED" if trial["outcome"] == "completed" else "FAILED")
