"""What one Tune trial runs: the Ray Train V2 + Tune pattern, where the trial is only the driver of
a `TorchTrainer` run and the epochs happen on the Train workers.

The trial's Train run is named after the trial id under <sweep>/trials/, so a trial restarted by
Tune (a crash, or a sweep restored after its driver died) finds its own Train run again and Ray
Train resumes it from its last epoch checkpoint. `TuneReportCallback` forwards each epoch's
`ray.train.report` (val_auroc, epoch, ...) to Tune, where ASHA and the searcher read it.

Stopping a trial (ASHA) aborts its Train run through `ehrfm.tune.ray_compat`, the one module that
uses Ray internals (why, and the Ray issue, are there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ehrfm.transfer.finetune import PreparedData, build_finetune_trainer, finetune_run_config
from ehrfm.transfer.finetune_config import FinetuneConfig
from ehrfm.tune.ray_compat import AbortingFunctionTrainable
from ehrfm.tune.runs import open_child_run
from ehrfm.tune.search_space import trial_config


@dataclass(frozen=True)
class TrialContext:
    """What every trial shares, fixed by the sweep driver (picklable; sent once with the trainable)."""

    base: dict[str, Any]  # the resolved base FinetuneConfig (prepare_finetune), as JSON data
    trials_dir: str  # Train runs go to <trials_dir>/<trial_id>
    sweep_name: str
    parent_run_id: str | None  # None: no MLflow
    artifact_root: str | None


def trial_finetune_config(context: TrialContext, point: dict[str, Any], trial_id: str) -> FinetuneConfig:
    cfg = trial_config(FinetuneConfig.model_validate(context.base), point)
    cfg.run.storage_path, cfg.run.name = context.trials_dir, trial_id
    return cfg


def trial_dirname(trial) -> str:
    """Short Tune trial directory names (the default embeds every searched value)."""
    return f"trial_{trial.trial_id}"


def fit_trial(point: dict[str, Any], context: TrialContext, data: PreparedData, trial_id: str, callbacks: list) -> None:
    """Open the trial's child MLflow run, then fit its TorchTrainer (results go to Tune)."""
    from ray.tune.integration.ray_train import TuneReportCallback  # constructible only inside a trial

    cfg = trial_finetune_config(context, point, trial_id)
    tracking_uri = cfg.mlflow.tracking_uri if cfg.mlflow.enabled else None
    if tracking_uri and context.parent_run_id:
        open_child_run(
            tracking_uri,
            cfg.mlflow.experiment,
            cfg.run_dir(),
            trial_id,
            context.sweep_name,
            context.parent_run_id,
            context.artifact_root,
            point,
        )
    Path(context.trials_dir).mkdir(parents=True, exist_ok=True)
    run_config = finetune_run_config(cfg, [*callbacks, TuneReportCallback()])
    trainer = build_finetune_trainer(cfg, data.ray_datasets(cfg), run_config, data=data, tracking_uri=tracking_uri)
    trainer.fit()


class SweepTrial(AbortingFunctionTrainable):
    """The Tune trainable of a sweep: each trial fits one fine-tune; Tune's stop aborts it."""

    _name = "finetune_trial"

    def setup(self, config, context: TrialContext | None = None, data: PreparedData | None = None):
        self._context, self._data = context, data
        super().setup(config)

    def fit(self, config: dict[str, Any], controller_callbacks: list) -> None:
        fit_trial(config, self._context, self._data, self.trial_id, controller_callbacks)
