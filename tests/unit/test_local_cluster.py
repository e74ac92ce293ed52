"""The local multi-node launcher: a real 2-node Ray cluster (head + 1 worker) with token auth.

The cluster lives in its own short temp dir with non-default ports, so it never touches the test
session's `ray_cluster` or the user's ~/.ray/auth_token, and `down` stops only its own processes.
Jobs are submitted the documented way: `ray job submit --working-dir . --runtime-env
cluster/runtime_env.yaml -- python ...` from the repository root; the pretraining job gets the
session's real MLflow server through MLFLOW_TRACKING_URI in the runtime env's env_vars.
"""

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
