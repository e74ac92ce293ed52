"""Pretraining without Ray: the shipped configs, config errors, the DeepSpeed config, the LR schedule,
training windows and the timelines manifest (the Ray Train + DeepSpeed runs: tests/integration, tests/e2e)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ehrfm.config import load_config
from ehrfm.constants import PAD_ID
from ehrfm.prs.person import float32_vectors
from ehrfm.training.config import PretrainConfig
from ehrfm.training.engine import WarmupCosine, deepspeed_config
from ehrfm.training.windows import TimelineManifest, WindowCollate
from tests.support.pretrain_setup import (
    CONFIGS,
    SMALL,
)
from tests.support.timeline_factory import write_timelines


# ---- configs and windows (no Ray) -------------------------------------------------------------
def test_the_shipped_pretrain_configs_validate():
    small = load_config(PretrainConfig, SMALL)
    assert (small.model.hidden, small.model.layers, small.model.context) == (64, 2, 128)
    assert not small.bf16 and small.scaling.num_workers == 2 and not small.scaling.use_gpu
    cpu_20k = load_config(PretrainConfig, CONFIGS / "pretrain-cpu-20k.yaml")  # the same decoder, longer window
    assert (cpu_20k.model.hidden, cpu_20k.model.layers, cpu_20k.model.context) == (64, 2, 512)
    assert cpu_20k.schedule.max_steps == 1500 and not cpu_20k.scaling.use_gpu
    big = load_config(PretrainConfig, CONFIGS / "pretrain-gpu-300m.yaml")
    m = big.model
    assert (m.hidden, m.layers, m.heads, m.context, m.prs_tokens, m.prs_hidden) == (960, 12, 8, 2048, 10, 4096)
    assert big.bf16 and big.scaling.use_gpu and big.deepspeed.zero_stage in (2, 3)
    assert big.scaling.num_workers > 1


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="zero_stge"):
        load_config(PretrainConfig, SMALL, ["deepspeed.zero_stge=3"])
    with pytest.raises(ValueError, match="stop_at_step"):
        load_config(PretrainConfig, SMALL, ["schedule.stop_at_step=100"])
    with pytest.raises(ValueError, match="bf16"):
        load_config(PretrainConfig, SMALL, ["deepspeed.precision=bf16"])
    with pytest.raises(ValueError, match="init_from"):
        load_config(PretrainConfig, SMALL, ["model.fusion=cross", "model.adapter=true"])
    with pytest.raises(ValueError, match="model.hiden"):
        load_config(PretrainConfig, SMALL, ["model.hiden=3"])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_follows_the_training_config(stage):
    cfg = load_config(PretrainConfig, SMALL, [f"deepspeed.zero_stage={stage}", "schedule.grad_accum=3"])
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == cfg.data.batch_size * 3 * 4
    assert ds["gradient_clipping"] == cfg.optim.grad_clip and ds["bf16"]["enabled"] is False
    assert ("stage3_prefetch_bucket_size" in ds["zero_optimization"]) == (stage == 3)
    gpu = load_config(PretrainConfig, CONFIGS / "pretrain-gpu-300m.yaml")
    assert deepspeed_config(gpu, 8)["bf16"]["enabled"] is True


def test_warmup_then_cosine_schedule():
    schedule = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.55)
    assert schedule(110) == pytest.approx(0.1) and schedule(500) == pytest.approx(0.1)
    values = [schedule(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_windows_are_slices_of_timelines_fixed_per_epoch(tmp_path):
    write_timelines(tmp_path, persons=60, files=1, min_events=5, max_events=200)
    table = pq.read_table(tmp_path / "timelines" / "part-00000.parquet")
    collate = WindowCollate(context=64, num_pgs=8, seed=3, epoch=0)
    batch = collate(table)
    assert batch["tokens"].shape == (60, 64) and batch["prs"].shape == (60, 8)
    torch.testing.assert_close(batch["tokens"][:, 1:], batch["targets"][:, :-1])
    tokens = table["tokens"].to_pylist()
    for row, timeline in enumerate(tokens):
        window = batch["tokens"][row].tolist() + [batch["targets"][row, -1].item()]
        real = [t for t in window if t != PAD_ID]
        start = next(i for i in range(len(timeline)) if timeline[i : i + len(real)] == real)
        assert len(real) == min(len(timeline) - start, 65)  # right-padded only when the timeline ends
        assert window[len(real) :] == [PAD_ID] * (65 - len(real))
    shuffled = table.take(np.random.default_rng(0).permutation(60))
    again = WindowCollate(64, 8, 3, 0)(shuffled)
    order = np.argsort(again["subject_id"].numpy())
    assert torch.equal(again["tokens"][order], batch["tokens"][np.argsort(batch["subject_id"].numpy())])
    later = WindowCollate(64, 8, 3, 1)(table)
    long_rows = np.array([len(t) > 80 for t in tokens])
    assert (later["tokens"][long_rows] != batch["tokens"][long_rows]).any(dim=1).float().mean() > 0.8
    assert torch.equal(batch["has_prs"], torch.from_numpy(table["has_prs"].to_numpy(zero_copy_only=False)))


def test_timelines_without_prs_collate_for_an_ehr_only_decoder(tmp_path):
    """OMOP without PRS files stores K = 0 as empty variable-length lists (not a fixed-size list):
    the collate reads them as [B, 0] scores, packed or not, and refuses a manifest that disagrees."""
    write_timelines(tmp_path, persons=30, files=1, min_events=5, max_events=100)
    table = pq.read_table(tmp_path / "timelines" / "part-00000.parquet")
    index = table.schema.get_field_index("prs")
    table = table.set_column(index, "prs", float32_vectors(np.zeros((30, 0), np.float32)))
    table = table.set_column(table.schema.get_field_index("has_prs"), "has_prs", pa.array([False] * 30))
    batch = WindowCollate(context=32, num_pgs=0, seed=0, epoch=0)(table)
    assert batch["prs"].shape == (30, 0) and batch["tokens"].shape == (30, 32) and not batch["has_prs"].any()
    packed = WindowCollate(context=32, num_pgs=0, seed=0, epoch=0, pack_prefix=0)(table)
    assert packed["prs"].shape == (30, 0) and packed["tokens"].shape[1] == 32
    with pytest.raises(ValueError, match="prs has 0 scores per person, the manifest says 8"):
        WindowCollate(context=32, num_pgs=8, seed=0, epoch=0)(table)


def test_manifest_problems_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        TimelineManifest.read(tmp_path)
    write_timelines(tmp_path, persons=10, files=1)
    manifest = tmp_path / "timelines" / "manifest.json"
    data = json.loads(manifest.read_text())
    assert TimelineManifest.read(tmp_path).vocab_size == data["vocab_size"]
    data["num_pgs"] = 3
    manifest.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="num_pgs=3"):
        TimelineManifest.read(tmp_path)
