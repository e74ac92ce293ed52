"""Sweep configuration (jobs/configs/tune-*.yaml): which fine-tune to vary, over what space, with
which search algorithm and early stopping, on how much of the cluster, and whether the winner is
registered. Unknown keys are rejected like every other config; a restarted sweep must keep the
configuration it was started with (sweep_config.json), since Tune restores its stored space."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ehrfm.config import Override, StrictModel, load_config, split_overrides
from ehrfm.model.risk import head_uses_prs
from ehrfm.transfer.finetune_config import FinetuneConfig
from ehrfm.tune.search_space import Dimension, complete_point, default_point, trial_config

SWEEP_CONFIG_FILE = "sweep_config.json"


class SchedulerSection(StrictModel):
    """ASHA on the validation AUROC reported after every epoch."""

    max_epochs: int | None = Field(None, ge=1)  # None: the fine-tune config's train.epochs
    grace_period: int = Field(1, ge=1)  # epochs every trial runs before it can be stopped
    reduction_factor: float = Field(2.0, gt=1.0)  # a trial continues past a rung when in the top 1/rf


class ResourcesSection(StrictModel):
    """A trial holds driver_cpus (the Tune function that drives the Train run) plus its Train
    workers' num_workers x cpus_per_worker; headroom_cpus stay free for Ray Data's read and split
    tasks, which would otherwise wait behind the trials forever."""

    driver_cpus: float = Field(0.25, gt=0)
    headroom_cpus: float = Field(1.0, ge=0)
    max_concurrent_trials: int | None = Field(None, ge=1)  # None: derived from the cluster's resources
    max_failures: int = Field(1, ge=-1)  # restarts of a crashed trial (its Train run resumes from its checkpoint)


class RegistrySection(StrictModel):
    enabled: bool = True  # the best trial goes through the champion rule (needs MLflow)
    n_boot: int = Field(200, ge=10)  # bootstrap resamples for the model card's test CIs


class SweepConfig(StrictModel):
    name: str = "tune"  # the sweep's directory is <storage_path>/<name>; the same name resumes it
    storage_path: str = "runs/tune"
    experiment: str = "ehrfm-tune"  # MLflow experiment of the parent run and its child runs
    num_samples: int = Field(8, ge=1)  # trials, the points to evaluate included
    search: Literal["auto", "optuna", "random"] = "auto"  # auto: Optuna when installed, else random
    seed: int = 0
    finetune_config: str = "jobs/configs/finetune-t2d.yaml"  # the base fine-tune (cwd or this file's dir)
    finetune_overrides: list[str] = []  # key.path=value for the base fine-tune config
    scheduler: SchedulerSection = SchedulerSection()
    resources: ResourcesSection = ResourcesSection()
    registry: RegistrySection = RegistrySection()
    include_default: bool = True  # the first trial is the base config itself (the default fine-tune)
    points_to_evaluate: list[dict[str, Any]] = []  # further points run first; missing keys take base values
    space: dict[str, Dimension] = {}

    @model_validator(mode="after")
    def _consistent(self) -> SweepConfig:
        if not self.space:
            raise ValueError("the sweep has an empty search space: give space entries")
        if "/" in self.name or self.name in {"", ".", ".."}:
            raise ValueError(f"sweep name {self.name!r} must be a plain directory name")
        return self

    def sweep_dir(self) -> Path:
        return Path(self.storage_path) / self.name

    def finetune_config_path(self, config_file: str | Path | None) -> Path:
        """The base fine-tune YAML: as given (absolute or from the cwd), else beside the sweep YAML."""
        path = Path(self.finetune_config)
        if path.is_absolute() or path.is_file() or config_file is None:
            return path
        beside = Path(config_file).parent / path.name
        return beside if beside.is_file() else path


def load_sweep(
    config_file: str | Path | None, overrides: list[Override] | None = None
) -> tuple[SweepConfig, FinetuneConfig]:
    """The sweep config and its base fine-tune config; `finetune.`-prefixed overrides go to the latter."""
    own, finetune = split_overrides(overrides or [], "finetune")
    sweep = load_config(SweepConfig, config_file, own)
    base = load_config(FinetuneConfig, sweep.finetune_config_path(config_file), sweep.finetune_overrides + finetune)
    return sweep, base


def sweep_points(sweep: SweepConfig, base: FinetuneConfig, decoder_fusion: str) -> list[dict[str, Any]]:
    """The points run first (the default fine-tune, then points_to_evaluate), after checking that
    every value the space can give makes a valid fine-tuning config for this decoder."""
    points = [default_point(sweep.space, base)] if sweep.include_default else []
    points += [complete_point(sweep.space, base, point) for point in sweep.points_to_evaluate]
    if len(points) > sweep.num_samples:
        raise ValueError(f"num_samples={sweep.num_samples} is smaller than the {len(points)} points evaluated first")
    anchor = points[0] if points else default_point(sweep.space, base)
    for key, dimension in sweep.space.items():
        for value in dimension.choice or list(dimension.loguniform or dimension.uniform or dimension.randint):
            try:
                cfg = trial_config(base, anchor | {key: value})
            except ValueError as err:
                raise ValueError(f"search space {key}={value!r} gives an invalid fine-tuning config: {err}") from err
            if head_uses_prs(cfg.model.head_inputs) and decoder_fusion == "none":
                raise ValueError(
                    f"search space {key}={value!r}: the decoder {base.model.pretrained} has no PRS "
                    f"fusion, so head_inputs {cfg.model.head_inputs} is impossible"
                )
    return points


def _flat(record: dict) -> dict[str, Any]:
    import pandas as pd

    return pd.json_normalize(record, sep=".").iloc[0].to_dict()


def check_or_record_config(sweep_dir: Path, sweep: SweepConfig, base: FinetuneConfig) -> bool:
    """Write sweep_config.json on the first start; on a restart, refuse a different configuration
    (its data paths included). True when the sweep is being resumed."""
    record = {
        "sweep": sweep.model_dump(mode="json", exclude={"registry"}),
        "finetune": base.model_dump(mode="json", exclude={"mlflow", "run"}),
    }
    path = sweep_dir / SWEEP_CONFIG_FILE
    if not path.is_file():
        sweep_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))
        return False
    stored, now = _flat(json.loads(path.read_text())), _flat(record)
    changed = sorted(k for k in stored.keys() | now.keys() if stored.get(k) != now.get(k))
    if changed:
        raise ValueError(
            f"sweep {sweep_dir} was started with another configuration ({', '.join(changed[:6])} "
            "differ): run it again with the same settings to resume it, or choose a new --name"
        )
    return True
