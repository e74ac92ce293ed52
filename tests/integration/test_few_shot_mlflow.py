"""`ehrfm few_shot`'s MLflow run on the session's tracking server: settings as params, each model's
metrics at step k, the output files as artifacts (the protocol itself: tests/unit/test_few_shot.py)."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow import MlflowClient

from ehrfm.evaluate.cross_fit import ZERO_SHOT, cross_fit_report
from ehrfm.evaluate.few_shot import (
    FM_LR,
    FM_LR_NO_PRS,
    Design,
    FewShotConfig,
    fm_design,
    paired_differences,
    run_few_shot,
    summarize,
)
from ehrfm.evaluate.few_shot_job import log_to_mlflow, published_counts, write_outputs

pytestmark = pytest.mark.mlflow


def test_run_has_params_metrics_per_k_and_artifacts(tmp_path, mlflow_server):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 8))
    y = (x[:, 0] > 1.0).astype(int)
    split = rng.choice(["train", "test"], size=600, p=[0.7, 0.3])
    config = FewShotConfig(shots=[1, 4, 10_000], replicates=2, models=[FM_LR], threads=1)
    records = run_few_shot({FM_LR: fm_design(x, None, None), "counts_hgb": Design("hgb", x[:, 1:])}, y, split, config)
    prs, has_prs = x[:, 1:2], np.ones(600, bool)
    designs = {
        FM_LR: fm_design(x[:, [0, 2]], prs, has_prs),
        FM_LR_NO_PRS: fm_design(x[:, [0, 2]], None, None),
        "counts_hgb": Design("hgb", x[:, [0, 2]]),
        "counts_prs_hgb": Design("hgb", x[:, :3]),
    }
    cross_config = config.model_copy(update={"shots": [], "cross_fit_folds": 3})
    zero_shot = 1 / (1 + np.exp(-(x[:, 0] + rng.standard_normal(600))))
    cross_fit = cross_fit_report(designs, y, np.arange(600), cross_config, n_boot=100, fixed={ZERO_SHOT: zero_shot})
    cross_fit["published"] = {"rows": "600", "events": str(y.sum())}
    result = {
        "config": config.model_dump(mode="json"),
        "pretrained": "ckpt",
        "labels": str(tmp_path / "labels.parquet"),
        "counts": published_counts(y, split),
        "summary": summarize(records),
        "paired": paired_differences(records),
        "records": records,
        "cross_fit": cross_fit,
    }
    paths = write_outputs(result, tmp_path / "out")
    run = MlflowClient(mlflow_server).get_run(log_to_mlflow(mlflow_server, result, paths))
    assert run.data.params["shots"] == "1,4,10000" and run.data.params["replicates"] == "2"
    assert run.data.params["fm_prs"] == "states" and run.data.params["lr_cv_folds"] == "3"
    logged = run.data.metrics
    gain = cross_fit["prs_gains"]["gains"]["fm_lr"]["auroc_difference"]
    assert logged["cross_fit/prs_gain/fm_lr/auroc_difference"] == pytest.approx(gain)
    contrast = cross_fit["prs_gains"]["targets"]["fm_lr"]["fm_gain_minus_share_of_hgb_gain"]
    assert logged["cross_fit/prs_gain/fm_lr/minus_share_of_hgb"] == pytest.approx(contrast)
    gap = cross_fit["zero_shot"]["auroc_difference"]
    assert logged["cross_fit/fm_lr-zero_shot/auroc_difference"] == pytest.approx(gap)
    ece = cross_fit["models"][ZERO_SHOT]["ece_recalibrated"]
    assert logged["cross_fit/zero_shot/ece_recalibrated"] == pytest.approx(ece)
    history = MlflowClient(mlflow_server).get_metric_history(run.info.run_id, "fm_lr/auroc_mean")
    assert sorted(m.step for m in history) == [1, 4]  # the impossible k has no metric, only replicates_fit 0
    paired = MlflowClient(mlflow_server).get_metric_history(run.info.run_id, "fm_lr-counts_hgb/auroc_difference_mean")
    expected = {r["k"]: r["auroc_difference_mean"] for r in result["paired"]}
    assert {m.step: m.value for m in paired} == pytest.approx(expected) and sorted(expected) == [1, 4]
    fitted = MlflowClient(mlflow_server).get_metric_history(run.info.run_id, "fm_lr/replicates_fit")
    assert {m.step: m.value for m in fitted}[10_000] == 0.0
    artifacts = {a.path for a in MlflowClient(mlflow_server).list_artifacts(run.info.run_id, "few_shot")}
    assert artifacts == {f"few_shot/{p.name}" for p in paths}
