"""How the zero-shot stage places and sizes its work (no Ray here): GPU actors when the cluster has
GPUs, chunks sized from free memory, results independent of the chunking, throughput accounting."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ehrfm.model import ModelConfig
from ehrfm.transfer.examples import build_examples
from ehrfm.transfer.zero_shot import (
    DEVICE_COLUMN,
    SECONDS_COLUMN,
    TOKENS_COLUMN,
    ZeroShotConfig,
    ZeroShotScorer,
    actor_placement,
    prompts_per_chunk,
    scoring_inputs,
    throughput,
)
from tests.support.zero_shot_cohort import T2D_TASK, write_tiny_cohort


def test_actors_go_on_gpus_when_the_cluster_has_them():
    config = ZeroShotConfig(concurrency=4, batch_size=32, gpu_batch_size=256, num_gpus=1.0)
    assert actor_placement(config, 0.0) == {"concurrency": 4, "num_cpus": 1.0, "batch_size": 32}
    on_gpus = actor_placement(config, 2.0)
    assert on_gpus == {"concurrency": 2, "num_gpus": 1.0, "num_cpus": 1.0, "batch_size": 256}
    assert actor_placement(config.model_copy(update={"device": "cpu"}), 8.0)["batch_size"] == 32
    with pytest.raises(ValueError, match="needs 1.0 GPU"):
        actor_placement(config.model_copy(update={"device": "cuda"}), 0.0)


def test_chunks_fit_the_free_memory_and_shrink_with_longer_histories():
    cfg = ModelConfig(vocab_size=30_000, hidden=960, layers=12, heads=8)  # the reference ~300M shape
    gib = 2**30
    short = prompts_per_chunk(cfg, 512, 16, 128, 100 * gib)
    long = prompts_per_chunk(cfg, 2048, 16, 128, 100 * gib)
    assert short > long > 1
    # the prompt's keys/values alone (bf16, once per person) must fit the budget the chunk is given
    kv_per_person = 2 * cfg.layers * 2048 * cfg.hidden * 2
    assert long * kv_per_person < 100 * gib
    assert prompts_per_chunk(cfg, 2048, 16, 128, 1) == 1  # never zero


def test_scores_do_not_depend_on_the_chunking(tmp_path, monkeypatch):
    write_tiny_cohort(tmp_path)
    config = ZeroShotConfig(n_samples=5, max_new_tokens=10, top_p=0.9)
    target_ids, gap_days, horizon, _ = scoring_inputs(tmp_path / "ckpt", tmp_path, T2D_TASK, config)
    examples = build_examples(tmp_path, pq.read_table(tmp_path / "labels.parquet"), 16)
    scorer = ZeroShotScorer(str(tmp_path / "ckpt"), target_ids, gap_days.tolist(), horizon, config.model_dump())
    whole = scorer(examples)
    monkeypatch.setattr(scorer, "chunk_size", lambda prompts, length: 3)
    chunked = scorer(examples)
    for column in ("zs_share", "zs_truncated", TOKENS_COLUMN):
        assert chunked[column].to_pylist() == whole[column].to_pylist()
    chunked_path, whole_path = chunked["zs_path_probability"].to_pylist(), whole["zs_path_probability"].to_pylist()
    # the batch size changes float32 rounding only (which kernels a CPU picks: 3e-9 seen on one machine)
    assert chunked_path == pytest.approx(whole_path, abs=1e-6)
    assert set(whole[DEVICE_COLUMN].to_pylist()) == {"cpu"}
    assert sum(whole[TOKENS_COLUMN].to_pylist()) > 0


def test_throughput_counts_persons_and_tokens():
    scored = pa.table(
        {
            TOKENS_COLUMN: pa.array([100, 50, 30, 20], pa.int64()),
            SECONDS_COLUMN: pa.array([0.5, 0.5, 0.25, 0.25]),
            DEVICE_COLUMN: pa.array(["cpu"] * 4),
        }
    )
    figures = throughput(scored, 2.0, ZeroShotConfig())
    assert figures["persons_per_s"] == 2.0
    assert figures["sampled_tokens_per_s"] == 100.0
    assert figures["persons_per_actor_s"] == round(4 / 1.5, 3)
    assert figures["devices"] == ["cpu"]
