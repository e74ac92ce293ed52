"""Packed pretraining batches through Ray Data: resuming mid-epoch (the loop's BatchStream skipping
consumed batches) reproduces the packed batches an uninterrupted run sees, because packing is a pure
function of the Ray batch. A tiny timeline dataset on the session's local Ray cluster."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ehrfm.config import load_config
from ehrfm.constants import PAD_ID
from ehrfm.training.checkpoint import TrainState
from ehrfm.training.config import PretrainConfig
from ehrfm.training.pretrain_loop import BatchStream
from tests.support.timeline_factory import write_timelines

CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "pretrain-cpu-small.yaml"


@pytest.mark.ray
def test_resume_mid_epoch_reproduces_the_packed_batches(ray_cluster, tmp_path):
    info = write_timelines(tmp_path, persons=48, num_pgs=8, vocab_size=40, files=1, max_events=60)
    table = pq.read_table(next((info.root / "timelines").glob("*.parquet")))
    dataset = ray_cluster.data.from_arrow(table.drop_columns(["split"])).materialize()
    overrides = ["data.batch_size=8", "data.shuffle_buffer=16", "model.context=64", "performance.packing=true"]
    cfg = load_config(PretrainConfig, CONFIG, overrides)
    per_epoch = len(table) // 8

    uninterrupted = BatchStream(dataset, cfg, info.num_pgs, TrainState())
    expected = [uninterrupted.next() for _ in range(per_epoch + 2)]  # into the second epoch
    skip = 2
    resumed = BatchStream(dataset, cfg, info.num_pgs, TrainState(epoch=0, batch_in_epoch=skip))
    again = [resumed.next() for _ in range(per_epoch + 2 - skip)]

    assert (uninterrupted.epoch, uninterrupted.consumed) == (resumed.epoch, resumed.consumed) == (1, 2)
    for want, got in zip(expected[skip:], again, strict=True):
        assert want.keys() == got.keys() and "segment" in got
        assert all(want[k].equal(got[k]) for k in want)
    first = expected[0]
    assert first["tokens"].shape[1] == cfg.model.prefix_length + 64 and len(first["subject_id"]) == 8
    assert len(first["tokens"]) < 8  # several persons share a row
    assert not expected[0]["subject_id"].equal(expected[per_epoch]["subject_id"])  # a new epoch, reshuffled
    assert int((first["targets"] != PAD_ID).sum()) > 0
