"""A full fine-tune on Ray Train (2 CPU workers) through the CLI's main(), on token labels whose answer is
known (tests/support/finetune_factory.py): the decoder changes, the token is learned, the PRS mask acts on
genotyped persons only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ehrfm.model.io import load_state_dict
from tests.support.finetune_factory import make_labels, timelines_table, write_finetune_data, write_pretrained
from tests.support.finetune_setup import CONFIG, FAST, predictions

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
def full(ray_cluster, data, pretrained, storage, mlflow_server):
    """Full fine-tune on token labels, through the CLI's main(); returns (run dir, labels)."""
    from ehrfm.transfer.finetune import main

    labels_path = storage / "token_labels.parquet"
    labels = make_labels(data, labels_path, "token")
    run_dir = storage / "full"
    code = main(
        [
            "--config",
            str(CONFIG),
            "--task",
            "t2d",
            "--pretrained",
            str(pretrained.parent),
            "--data",
            str(data.root),
            "--labels",
            str(labels_path),
            "--out",
            str(run_dir),
            *FAST,
            "model.mode=full",
            "optim.head_lr=0.01",
            "optim.backbone_lr=0.003",
            "train.epochs=2",
            f"mlflow.tracking_uri={mlflow_server}",
        ]
    )
    assert code == 0
    return run_dir, labels


@pytest.mark.ray
@pytest.mark.e2e
def test_full_fine_tune_changes_the_decoder_and_learns_the_token(full, pretrained):
    run_dir, _ = full
    final, base = load_state_dict(run_dir / "model"), load_state_dict(pretrained)
    changed = [k for k, v in base.items() if not torch.equal(final[f"decoder.{k}"], v)]
    assert len(changed) > 0.8 * len(base)
    summary = json.loads((run_dir / "finetune_result.json").read_text())
    history = summary["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"], history  # it learns ...
    assert summary["metrics"]["test_auroc"] > 0.8, summary["metrics"]  # ... what generalises


@pytest.mark.ray
@pytest.mark.e2e
def test_prs_mask_changes_only_genotyped_predictions(full, data):
    run_dir, _ = full
    table = predictions(run_dir)
    genotyped = dict(zip(timelines_table(data)["subject_id"].to_pylist(), timelines_table(data)["has_prs"].to_pylist()))
    has = np.array([genotyped[s] for s in table["subject_id"].to_pylist()])
    logit, masked = table["logit"].to_numpy(), table["logit_prs_masked"].to_numpy()
    assert has.sum() > 20 and (~has).sum() > 20
    np.testing.assert_array_equal(logit[~has], masked[~has])
    np.testing.assert_array_equal(table["risk"].to_numpy()[~has], table["risk_prs_masked"].to_numpy()[~has])
    assert (np.abs(logit[has] - masked[has]) > 1e-6).all()
