"""What one Tune trial runs: the Ray Train V2 + Tune pattern, where the trial is only the driver of
a `TorchTrainer` run and the epochs happen on the Train workers.

The trial's Train run is named after the trial id under <sweep>/trials/, so a trial restarted by
Tune (a crash, or a sweep restored after its driver died) finds its own Train run again and Ray
Train resumes it from its last epoch checkpoint. `TuneReportCallback` forwards each epoch's
`ray.train.report` (val_auroc, epoch, ...) to Tune, where ASHA and the searcher read it.

Stopping a trial (ASHA) ends its Tune actor. The Train controller it started would die with it
and leave its workers' placement group behind (placement groups live as long as the job; Ray's
own cleaner for this needs the dashboard's state API, which a test cluster or a busy machine may
not have), and the next trial would wait forever for those CPUs. So the trial aborts its Train
run itself when Tune stops it: the controller hands its actor handle to the trial when it starts
(`ControllerHandleCallback`, a Ray Train developer-API callback), and `SweepTrial.cleanup` calls
the controller's `abort`, which shuts the workers down and removes the placement group.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.tune.trainable.function_trainable import FunctionTrainable

from ehrfm.transfer.finetune import PreparedData, build_finetune_trainer, finetune_run_config
from ehrfm.transfer.finetune_config import FinetuneConfig
from ehrfm.tune.runs import open_child_run
from ehrfm.tune.search_space import trial_config

ABORT_TIMEOUT_S = 60.0  # the controller's abort: stop the workers, remove the placement group


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


class ControllerHandleCallback(ControllerCallback):
    """Runs inside the Train controller: puts the controller's own handle in the trial's mailbox."""

    def __init__(self, mailbox):
        self._mailbox = mailbox

    def after_controller_start(self, train_run_context) -> None:
        self._mailbox.put(ray.get_runtime_context().current_actor)


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


class SweepTrial(FunctionTrainable):
    """The Tune trainable of a sweep: a function trainable whose stop aborts its Train run."""

    _name = "finetune_trial"

    def setup(self, config, context: TrialContext | None = None, data: PreparedData | None = None):
        self._context, self._data = context, data
        self._mailbox, self._fit_thread = None, None
        self._stopping = False
        super().setup(config)

    def _trainable_func(self, config: dict[str, Any]):
        from ray.util.queue import Queue

        if self._stopping:
            return None
        self._fit_thread = threading.current_thread()
        self._mailbox = Queue(maxsize=1, actor_options={"num_cpus": 0})
        try:
            fit_trial(config, self._context, self._data, self.trial_id, [ControllerHandleCallback(self._mailbox)])
        except Exception:
            if self._stopping:  # the run was aborted because Tune stopped the trial: not a failure
                return None
            raise
        return None

    def cleanup(self):
        """Tune's stop (ASHA, or the end of the sweep): abort a Train run still going, wait for it."""
        self._stopping = True
        runner = self._fit_thread
        if runner is not None and runner.is_alive() and self._mailbox is not None:
            try:
                controller = self._mailbox.get(timeout=ABORT_TIMEOUT_S)
                ray.get(controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
            except (queue.Empty, ray.exceptions.RayError, TimeoutError):
                pass  # the controller already ended (its exit also ends the abort call)
            runner.join(timeout=ABORT_TIMEOUT_S)
        super().cleanup()
