"""bench/gpu_pretrain.py: the prepared GPU call of #16 compares what it says it compares."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

from ehrfm.config import load_config
from ehrfm.training.config import PretrainConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_pretrain", REPO / "bench" / "gpu_pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(overrides: list[str], config: str = "jobs/configs/pretrain-gpu-300m.yaml") -> PretrainConfig:
    return load_config(PretrainConfig, REPO / config, overrides)


def test_the_baseline_turns_off_exactly_the_recipe_and_both_share_one_short_schedule(bench, tmp_path):
    args = argparse.Namespace(
        smoke=False, baseline_batch=8, cpus_per_worker=8, steps=60, log_every=20, val_windows=64, override=["x.y=1"]
    )
    shared = bench.shared_overrides(args, tmp_path)
    variants = bench.variant_overrides(args)
    assert shared[-1] == "x.y=1"  # the caller's overrides come last: they win
    shared = shared[:-1]
    recipe, baseline = _config(shared + variants["recipe"]), _config(shared + variants["baseline"])
    # the recipe is the config as written: packing, fused loss, compile (None = on with GPUs), bf16
    assert variants["recipe"] == []
    assert (recipe.performance.packing, recipe.performance.fused_loss, recipe.performance.compile) == (True, True, None)
    assert recipe.deepspeed.precision == "bf16" and recipe.scaling.use_gpu
    assert (baseline.performance.packing, baseline.performance.fused_loss, baseline.performance.compile) == (
        False,
        False,
        False,
    )
    assert baseline.data.batch_size == 8 and recipe.data.batch_size == 24
    for cfg in (recipe, baseline):  # everything else the same: one worker, the short schedule, no MLflow
        assert cfg.scaling.num_workers == 1 and not cfg.mlflow.enabled
        assert (cfg.schedule.max_steps, cfg.schedule.log_every, cfg.schedule.checkpoint_every) == (60, 20, 60)
        assert cfg.optim.warmup_steps < cfg.schedule.max_steps
        assert cfg.model == recipe.model and cfg.deepspeed == recipe.deepspeed


def test_the_table_reads_the_runs_figures_and_marks_a_failed_run(bench):
    ok = {"variant": "recipe", "returncode": 0, "wall_s": 100.0, "mfu_real_tokens": 0.512, "tokens_per_s": 3000.0}
    ok |= {"positions_per_s": 3300.0, "useful_token_fraction": 0.909, "peak_memory_mb_max_worker": 20480.0}
    base = {"variant": "baseline", "returncode": 0, "wall_s": 90.0, "mfu_real_tokens": 0.2, "tokens_per_s": 1000.0}
    failed = {"variant": "baseline", "returncode": "timeout", "wall_s": 420.0, "log_tail": "..."}
    result = {"config": "c.yaml", "steps": 60, "log_every": 20, "device": "NVIDIA H200"}
    table = bench.markdown({**result, "variants": [ok, base]})
    assert "| recipe | 51.2% |" in table and "| 0.909 |" in table and "| 20.0 |" in table
    assert "recipe over baseline: 3.00x" in table
    table = bench.markdown({**result, "variants": [ok, failed]})
    assert "| baseline | — | — |" in table and "| timeout |" in table and "recipe over baseline" not in table
