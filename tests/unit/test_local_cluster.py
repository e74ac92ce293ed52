"""The local multi-node launcher's plans, without starting anything: GPUs per worker node, and a Ray temp dir
too long for its sockets refused up front (the real clusters: tests/e2e/test_local_cluster.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ehrfm.cluster.local import LocalClusterSpec, _head_args, _worker_env, free_port, up


def test_worker_nodes_get_distinct_gpus_and_the_head_none():
    spec = LocalClusterSpec(state_dir=Path("/tmp/x"), workers=2, worker_gpus=2)
    assert [_worker_env({}, index, 2).get("CUDA_VISIBLE_DEVICES") for index in range(2)] == ["0,1", "2,3"]
    assert "CUDA_VISIBLE_DEVICES" not in _worker_env({}, 0, 0)
    head = _head_args(spec)
    assert head[head.index("--num-gpus") + 1] == "0"
    assert head[head.index("--dashboard-host") + 1] == "127.0.0.1"


def test_a_too_long_ray_temp_dir_is_refused_before_anything_starts(tmp_path):
    spec = LocalClusterSpec(state_dir=tmp_path / ("deep" * 10), dashboard_port=free_port())
    with pytest.raises(ValueError, match="107-byte limit"):
        up(spec)
    assert not (spec.state_dir / "logs").exists()
