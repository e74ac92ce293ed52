"""Fine-tuning on Ray Train (2 CPU workers) from a tiny decoder: a linear probe on PRS labels through
run_finetune, logged to the session's MLflow server, on the data of tests/support/finetune_factory.py
(labels whose answer is known); the full fine-tune through the CLI is in tests/e2e."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from ehrfm.model.io import load_state_dict
from ehrfm.model.risk import load_risk_model
from ehrfm.preprocess.tokenizer import Tokenizer
from tests.support.finetune_factory import make_labels, timelines_table, write_finetune_data, write_pretrained
from tests.support.finetune_setup import config, predictions

pytestmark = pytest.mark.mlflow


# ---- data and model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_finetune_data(tmp_path_factory.mktemp("ft-data"))


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory) -> Path:
    """A randomly initialised decoder with PRS prefix fusion, saved as a pretraining checkpoint."""
    return write_pretrained(data, tmp_path_factory.mktemp("pretrain"))


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ft-runs")


@pytest.fixture(scope="module")
def probe(ray_cluster, data, pretrained, storage, mlflow_server):
    """Linear probe on PRS labels over two windows of history, run through run_finetune; returns
    (config, summary, labels)."""
    from ehrfm.transfer.finetune import run_finetune

    path = storage / "prs_labels.parquet"
    labels = make_labels(data, path, "prs")
    cfg = config(
        data,
        pretrained,
        path,
        storage,
        "probe",
        "model.mode=linear_probe",
        "optim.head_lr=0.03",
        "train.modality_dropout=0.0",
        "data.history_windows=2",
        "model.value_codes=3",  # the head also reads the window's value bins (the factory's tokens hold some)
        "model.value_encoding=cumulative",  # as cumulative columns (the predictor's tests cover one_hot)
        f"mlflow.tracking_uri={mlflow_server}",
    )
    return cfg, run_finetune(cfg), labels


# ---- Ray Train runs -------------------------------------------------------------------------
@pytest.mark.ray
def test_linear_probe_trains_only_the_head_and_reads_the_prs(probe, pretrained):
    from ehrfm.transfer.finetune_loop import build_risk_model

    cfg, summary, _ = probe
    final = load_state_dict(Path(summary["model_dir"]))
    base = load_state_dict(pretrained)
    for key, value in base.items():  # decoder bit-identical to the pretrained checkpoint
        assert torch.equal(final[f"decoder.{key}"], value), key
    resolved = cfg.model_copy(deep=True)
    resolved.model.pretrained = str(pretrained)
    _, spec = load_risk_model(Path(summary["model_dir"]))
    initial = build_risk_model(resolved, spec.value_readout()).head.state_dict()  # the seeded head before training
    assert not torch.allclose(final["head.linear.weight"], initial["linear.weight"])
    m = summary["metrics"]
    # Label = PRS column 0 > 0 (genotyped only): learned through the PRS, gone when it is masked.
    assert m["val_auroc"] > 0.8 and m["test_auroc"] > 0.8, m
    assert m["test_auroc_prs_masked"] < m["test_auroc"] - 0.2, m


@pytest.mark.ray
def test_val_auroc_is_reported_each_epoch_and_logged(probe, mlflow_server):
    cfg, summary, _ = probe
    history = summary["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(0.0 <= h["val_auroc"] <= 1.0 and 0.0 <= h["val_auroc_prs_masked"] <= 1.0 for h in history)
    assert all(h["val_examples"] == summary["counts"]["val"]["examples"] for h in history)  # every val row
    best = history[int(summary["metrics"]["best_epoch"]) - 1]  # the kept epoch has the top val AUROC ...
    assert best["val_auroc"] == max(h["val_auroc"] for h in history)
    assert summary["metrics"]["val_auroc"] == pytest.approx(best["val_auroc"], abs=1e-6)  # ... and its weights
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs(
        [client.get_experiment_by_name("ehrfm-finetune").experiment_id],
        filter_string=f"tags.`ehrfm.run_dir` = '{cfg.run_dir()}'",
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    points = client.get_metric_history(runs[0].info.run_id, "val_auroc")
    assert [p.step for p in points] == [1, 2, 3]
    assert [p.value for p in points] == pytest.approx([h["val_auroc"] for h in history])
    assert runs[0].data.metrics["final_test_auroc"] == pytest.approx(summary["metrics"]["test_auroc"])
    assert runs[0].data.params["config.model.mode"] == "linear_probe"


@pytest.mark.ray
def test_predictions_are_val_and_test_examples_with_their_labels(probe, data):
    cfg, _, labels = probe
    run_dir = Path(cfg.run_dir())
    table = predictions(run_dir)
    assert table.column_names == [
        "subject_id",
        "prediction_time",
        "split",
        "label",
        "risk",
        "risk_prs_masked",
        "logit",
        "logit_prs_masked",
    ]
    split_of = dict(zip(timelines_table(data)["subject_id"].to_pylist(), timelines_table(data)["split"].to_pylist()))
    expected = {
        (s, t, y)
        for s, t, y in zip(
            labels["subject_id"].to_pylist(), labels["prediction_time"].to_pylist(), labels["boolean_value"].to_pylist()
        )
        if split_of[s] in ("val", "test")
    }
    got = list(zip(table["subject_id"].to_pylist(), table["prediction_time"].to_pylist(), table["label"].to_pylist()))
    assert len(got) == len(expected) and set(got) == expected
    assert [split_of[s] for s in table["subject_id"].to_pylist()] == table["split"].to_pylist()


@pytest.mark.ray
def test_platt_calibration_is_fit_on_validation_only(probe):
    from ehrfm.calibration import fit_platt

    cfg, summary, _ = probe
    run_dir = Path(cfg.run_dir())  # PRS labels: validation is not perfectly separated
    table = predictions(run_dir)
    _, spec = load_risk_model(run_dir / "model")
    risk, logit = table["risk"].to_numpy(), table["logit"].to_numpy()
    masked_risk = table["risk_prs_masked"].to_numpy()
    assert ((risk > 0) & (risk < 1)).all() and ((masked_risk > 0) & (masked_risk < 1)).all()
    np.testing.assert_allclose(risk, 1 / (1 + np.exp(-(spec.platt[0] * logit + spec.platt[1]))), rtol=1e-9)
    split, label = np.array(table["split"].to_pylist()), table["label"].to_numpy(zero_copy_only=False)
    assert spec.platt == pytest.approx(fit_platt(logit[split == "val"], label[split == "val"]), rel=1e-6)
    assert spec.platt != pytest.approx(fit_platt(logit, label), rel=1e-3)  # test rows were not used
    assert len(spec.reference_quantiles) == 101
    assert spec.percentile(np.array([spec.reference_quantiles[50]]))[0] == pytest.approx(50.0)
    assert spec.metrics == summary["metrics"] and spec.task == "t2d" and spec.horizon_days == 730


@pytest.mark.ray
def test_saved_model_directory_round_trips(probe, data):
    from ehrfm.transfer.examples import build_examples
    from ehrfm.transfer.finetune import predict_examples

    cfg, _, labels = probe
    run_dir = Path(cfg.run_dir())
    model, spec = load_risk_model(run_dir / "model")
    tokenizer = Tokenizer.load(data.root / "tokenizer.json")
    assert (
        spec.context == 32 and spec.tokenizer_version == tokenizer.version and spec.head_inputs == "last+mean+prs"
    )  # the shipped default
    assert spec.history_windows == 2  # the windows the probe read travel with the model
    # so do the value readout's codes and ids: the worker's head read them, the loaded model reads them too
    assert spec.value_codes == ["C00", "C01", "C02"] and spec.value_recency_days == [30, 365]
    assert spec.value_encoding == "cumulative" and spec.value_readout().encoding == "cumulative"
    assert spec.value_code_ids == [tokenizer.token_id[c] for c in spec.value_codes]
    assert model.head.linear.in_features == 3 * 32 + 3 * 3 * 10
    table = predictions(run_dir)
    examples = build_examples(data.root, labels, spec.context, spec.history_windows)
    val = examples.filter(pc.equal(examples["split"], "val"))
    older = np.stack(val["window_lengths"].to_numpy(zero_copy_only=False))[:, 0]
    assert (older > 0).mean() > 0.2  # many rows have history before their newest window
    logit, masked = predict_examples(model, val, batch_size=50)
    np.testing.assert_allclose(
        logit, table.filter(pc.equal(table["split"], "val"))["logit"].to_numpy(), rtol=1e-5, atol=1e-6
    )
    best = json.loads((run_dir / "finetune_result.json").read_text())["best_checkpoint"]
    again, _ = load_risk_model(best)  # the best epoch's checkpoint holds the same weights
    np.testing.assert_allclose(predict_examples(again, val)[1], masked, rtol=1e-5, atol=1e-6)
