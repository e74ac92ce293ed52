"""MLflow logging for pretraining and fine-tuning, used by rank 0 only: params once, metrics every
log step (pretraining) or epoch (fine-tuning).

A run is keyed by its Ray Train run directory (tag `ehrfm.run_dir`), so a resumed or restarted run
keeps logging into the same MLflow run, with the same step axis. Only counts, losses and system
figures are logged, never patient-level values.
"""

from __future__ import annotations

import os
from typing import Any

from ehrfm.tracking import CLIENT_RETRY_ENV, EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, ensure_tracking_uri

RUN_TAG = "ehrfm.run_dir"


def resolve_tracking_uri(configured: str | None, storage_path: str) -> str:
    """Config value, else `ensure_tracking_uri()`: $MLFLOW_TRACKING_URI, or the local server, started
    (detached) or reused. The driver calls this once and hands the answer to the workers, so no
    worker starts a server. A run that wants no server sets a store explicitly (`sqlite:///...`).
    """
    if configured:
        return configured
    if "://" in storage_path and not os.environ.get("MLFLOW_TRACKING_URI"):
        # a loopback server on the driver's machine is out of reach of a remote cluster's workers
        raise ValueError(f"storage {storage_path} is remote: set mlflow.tracking_uri or MLFLOW_TRACKING_URI")
    return ensure_tracking_uri()


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = value


class RunLogger:
    """Thin wrapper over an MlflowClient bound to one run (no global mlflow state in the worker)."""

    def __init__(self, tracking_uri: str, experiment: str, run_dir: str, run_name: str, artifact_root: str | None):
        from mlflow import MlflowClient

        # workers of a running cluster do not inherit the driver's environment: the retry settings again
        for key, value in CLIENT_RETRY_ENV.items():
            os.environ.setdefault(key, value)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        kind = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}  # open on the runs table, not GenAI traces
        if found is None:
            experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_root, tags=kind)
        else:
            experiment_id = found.experiment_id
            if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        runs = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_dir}'", max_results=1)
        if runs:
            self.run_id = runs[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            self.resumed = True
        else:
            run = self.client.create_run(experiment_id, run_name=run_name, tags={RUN_TAG: run_dir})
            self.run_id = run.info.run_id
            self.resumed = False

    def log_params(self, params: dict[str, Any]) -> None:
        flat: dict[str, Any] = {}
        _flatten("", params, flat)
        existing = self.client.get_run(self.run_id).data.params
        from mlflow.entities import Param

        fresh = [Param(k, str(v)[:6000]) for k, v in flat.items() if k not in existing]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def open_run_logger(
    loop_config: dict,
    rank: int,
    experiment: str,
    run_dir: str,
    run_name: str,
    params: dict[str, Any],
    config_text: str,
    config_name: str,
) -> RunLogger | None:
    """Rank 0's logger for a training loop (None on other ranks, or with no tracking URI): opens or
    reopens the run, logs `params` and, on a fresh run, the config as `config_name`."""
    tracking_uri = loop_config.get("tracking_uri")
    if rank != 0 or not tracking_uri:
        return None
    logger = RunLogger(tracking_uri, experiment, run_dir, run_name, loop_config.get("artifact_root"))
    logger.log_params(params)
    if not logger.resumed:
        logger.log_text(config_text, config_name)
    return logger
