"""Sweep definitions without Ray: the shipped sweep's search space, points that become valid fine-tuning
configs (bad spaces named), concurrent trials that follow the cluster's resources (the sweeps: tests/e2e)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ehrfm.config import load_config
from ehrfm.training.config import ScalingSection
from ehrfm.transfer.finetune_config import FinetuneConfig
from ehrfm.tune.resources import max_concurrent_trials
from ehrfm.tune.search_space import Dimension, complete_point, default_point, trial_config, tune_space
from ehrfm.tune.sweep import load_sweep

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "jobs" / "configs" / "tune-t2d.yaml"
LEARNS, LEARNS_TOO, CANNOT_LEARN = 0.03, 0.01, 1e-7


# ---- no Ray -------------------------------------------------------------------------------------
def test_shipped_sweep_searches_the_issue_space():
    sweep, base = load_sweep(CONFIG)
    assert {
        "optim.head_lr",
        "optim.backbone_lr",
        "optim.weight_decay",
        "model.head_dropout",
        "model.head_inputs",
        "model.mode",
        "model.unfrozen_layers",
        "train.modality_dropout",
    } <= set(sweep.space)
    assert sweep.include_default and sweep.scheduler.grace_period == 1 and sweep.registry.enabled
    assert (base.scaling.num_workers, base.scaling.cpus_per_worker) == (1, 1.0)  # the sweep's own override
    domains = tune_space(sweep.space)
    assert domains["model.mode"].categories == ["linear_probe", "partial", "full"]
    assert (domains["model.unfrozen_layers"].lower, domains["model.unfrozen_layers"].upper) == (1, 3)  # 2 included
    assert (domains["optim.head_lr"].lower, domains["optim.head_lr"].upper) == (3e-4, 3e-2)
    assert type(domains["optim.head_lr"].sampler).__name__ == "_LogUniform"
    default = default_point(sweep.space, base)  # the default fine-tune, the sweep's first trial
    assert default["model.mode"] == "linear_probe" and default["optim.head_lr"] == base.optim.head_lr


def test_points_become_valid_fine_tuning_configs_and_bad_spaces_are_named():
    base = load_config(FinetuneConfig, REPO / "jobs" / "configs" / "finetune-t2d.yaml")
    space = {
        "model.mode": Dimension(choice=["linear_probe", "partial", "full"]),
        "model.unfrozen_layers": Dimension(randint=(1, 2)),
        "optim.head_lr": Dimension(loguniform=(1e-4, 1e-2)),
    }
    partial = trial_config(
        base, {"model.mode": "partial", "model.unfrozen_layers": 0, "optim.head_lr": np.float64(2e-3)}
    )
    assert (partial.model.mode, partial.model.unfrozen_layers, partial.optim.head_lr) == ("partial", 1, 2e-3)
    assert trial_config(base, {"model.mode": "full", "model.unfrozen_layers": 2}).model.unfrozen_layers == 0
    assert base.model.mode == "linear_probe"  # the base is not modified
    point = complete_point(space, base, {"optim.head_lr": 0.5})  # out of range: allowed for a fixed point
    # the unused layer count sits inside its range (no out-of-distribution point for Optuna) and
    # still gives the linear probe no unfrozen layer
    assert point == {"model.mode": "linear_probe", "model.unfrozen_layers": 1, "optim.head_lr": 0.5}
    assert trial_config(base, point).model.unfrozen_layers == 0
    with pytest.raises(ValueError, match="optim.head_lrr"):
        trial_config(base, {"optim.head_lrr": 1e-3})
    with pytest.raises(ValueError, match="does not search"):
        complete_point(space, base, {"optim.weight_decay": 0.1})
    with pytest.raises(ValueError, match="not one of the choices"):
        complete_point(space, base, {"model.mode": "lora"})
    with pytest.raises(ValueError, match="modality_dropout"):
        trial_config(base, {"train.modality_dropout": 1.5})
    with pytest.raises(ValueError, match="exactly one"):
        Dimension(uniform=(0.0, 1.0), choice=[1])
    with pytest.raises(ValueError, match="0 < low < high"):
        Dimension(loguniform=(0.0, 1.0))


def test_concurrent_trials_follow_the_cluster_resources():
    one = ScalingSection(num_workers=1, cpus_per_worker=1.0)
    assert max_concurrent_trials({"CPU": 2.0}, one, 0.25, 0.5) == 1  # the test cluster: trials one at a time
    assert max_concurrent_trials({"CPU": 16.0}, one, 0.25, 1.0) == 12  # floor(15 / 1.25)
    assert max_concurrent_trials({"CPU": 2.4}, ScalingSection(num_workers=2, cpus_per_worker=0.3), 0.1, 0.0) == 3
    gpus = ScalingSection(num_workers=4, cpus_per_worker=2.0, use_gpu=True)
    assert max_concurrent_trials({"CPU": 128.0, "GPU": 8.0}, gpus, 0.25, 1.0) == 2  # the GPUs limit it
    assert max_concurrent_trials({"CPU": 2.0}, ScalingSection(num_workers=2, cpus_per_worker=0.5), 0.25, 1.0) == 1
    with pytest.raises(ValueError, match="needs 4.25 CPUs"):
        max_concurrent_trials({"CPU": 2.0}, ScalingSection(num_workers=2, cpus_per_worker=2.0), 0.25, 0.0)
