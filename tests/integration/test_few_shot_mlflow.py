"""`ehrfm few_shot`'s MLflow run on the session's tracking server: settings as params, each model's
metrics at step k, the output files as artifacts (the protocol itself: tests/unit/test_few_shot.py)."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow import MlflowClient

from ehrfm.evaluate.few_shot import FM_LR, FewShotConfig, fm_design, run_few_shot, summarize
from ehrfm.evaluate.few_shot_job import log_to_mlflow, published_counts, write_outputs

pytestmark = pytest.mark.mlflow


def test_run_has_params_metrics_per_k_and_artifacts(tmp_path, mlflow_server):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 8))
    y = (x[:, 0] > 1.0).astype(int)
    split = rng.choice(["train", "test"], size=600, p=[0.7, 0.3])
    config = FewShotConfig(shots=[1, 4, 10_000], replicates=2, models=[FM_LR], threads=1)
    records = run_few_shot({FM_LR: fm_design(x, None, None)}, y, split, config)
    result = {
        "config": config.model_dump(mode="json"),
        "pretrained": "ckpt",
        "labels": str(tmp_path / "labels.parquet"),
        "counts": published_counts(y, split),
        "summary": summarize(records),
        "records": records,
    }
    paths = write_outputs(result, tmp_path / "out")
    run = MlflowClient(mlflow_server).get_run(log_to_mlflow(mlflow_server, result, paths))
    assert run.data.params["shots"] == "1,4,10000" and run.data.params["replicates"] == "2"
    history = MlflowClient(mlflow_server).get_metric_history(run.info.run_id, "fm_lr/auroc_mean")
    assert sorted(m.step for m in history) == [1, 4]  # the impossible k has no metric, only replicates_fit 0
    fitted = MlflowClient(mlflow_server).get_metric_history(run.info.run_id, "fm_lr/replicates_fit")
    assert {m.step: m.value for m in fitted}[10_000] == 0.0
    artifacts = {a.path for a in MlflowClient(mlflow_server).list_artifacts(run.info.run_id, "few_shot")}
    assert artifacts == {f"few_shot/{p.name}" for p in paths}
