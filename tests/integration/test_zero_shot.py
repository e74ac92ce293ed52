"""Zero-shot risk from sampled futures: the Ray Data job (real Ray) against the in-process scorer
(the sampler, the path probability and KV-cache decoding: tests/unit/test_zero_shot.py)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from ehrfm.transfer.examples import build_examples
from ehrfm.transfer.zero_shot import (
    ZeroShotConfig,
    ZeroShotScorer,
    main,
    scoring_inputs,
)
from tests.support.zero_shot_cohort import T2D_TASK, write_tiny_cohort

pytestmark = pytest.mark.ray


def test_ray_data_job_matches_the_in_process_scorer(tmp_path, ray_cluster):
    write_tiny_cohort(tmp_path)
    overrides = [
        "n_samples=6",
        "max_new_tokens=12",
        "batch_size=3",
        "concurrency=2",
        "num_cpus=0.5",
        "n_boot=50",
        "top_p=0.9",
    ]
    task_file = tmp_path / "task.yaml"
    task_file.write_text(json.dumps(T2D_TASK.model_dump()))
    assert (
        main(
            [
                "--pretrained",
                str(tmp_path / "ckpt"),
                "--data",
                str(tmp_path),
                "--labels",
                str(tmp_path / "labels.parquet"),
                "--task",
                str(task_file),
                "--out",
                str(tmp_path / "out"),
                *overrides,
            ]
        )
        == 0
    )
    scored = pq.read_table(tmp_path / "out" / "zero_shot.parquet")
    assert scored.column_names == [
        "subject_id",
        "prediction_time",
        "split",
        "label",
        "zs_share",
        "zs_path_probability",
        "zs_truncated",
    ]
    assert scored.num_rows == 10

    config = ZeroShotConfig.model_validate(dict(o.split("=") for o in overrides))
    target_ids, gap_days, horizon, _ = scoring_inputs(tmp_path / "ckpt", tmp_path, T2D_TASK, config)
    labels = pq.read_table(tmp_path / "labels.parquet")
    examples = build_examples(tmp_path, labels, 16)
    scorer = ZeroShotScorer(str(tmp_path / "ckpt"), target_ids, gap_days.tolist(), horizon, config.model_dump())
    in_process = scorer(examples)  # one batch of 10 instead of Ray's batches of 3 on two actors
    assert scored["subject_id"].to_pylist() == in_process["subject_id"].to_pylist()
    assert scored["zs_share"].to_pylist() == in_process["zs_share"].to_pylist()
    np.testing.assert_allclose(
        scored["zs_path_probability"].to_numpy(), in_process["zs_path_probability"].to_numpy(), atol=1e-9
    )
    assert 0 < np.mean(scored["zs_path_probability"].to_numpy()) < 1

    summary = json.loads((tmp_path / "out" / "zero_shot_summary.json").read_text())
    assert summary["examples"] == 10 and summary["trajectories"] == 60
    assert summary["truncated_trajectories"] == int(np.sum(scored["zs_truncated"].to_numpy()))
    assert summary["target_codes"]["not_in_vocabulary"] == 1
    assert set(summary["splits"]) == {"val", "test"}
    assert (
        summary["splits"]["val"]["auroc_zs_path_probability"]["lower"]
        <= summary["splits"]["val"]["auroc_zs_path_probability"]["value"]
    )
