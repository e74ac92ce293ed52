"""Fine-tuning on Ray Train (2 CPU workers, DDP over gloo) from a tiny decoder, on timelines from
tests/support/timeline_factory.py with labels whose answer is known (PRS labels and token labels, see
tests/support/finetune_factory.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from ehrfm.config import load_config
from ehrfm.model.config import ModelConfig
from ehrfm.model.io import load_state_dict, save_model_files
from ehrfm.model.risk import load_risk_model
from ehrfm.model.transformer import EHRDecoder
from ehrfm.transfer.finetune_config import FinetuneConfig
from tests.support.finetune_factory import DAY_US, make_labels, timelines_table, write_finetune_data, write_pretrained

CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "finetune-t2d.yaml"
FAST = [
    "train.epochs=3",
    "train.batch_size=16",
    "train.shuffle_buffer=64",
    "train.eval_batch_size=64",
    "scaling.num_workers=2",
    "scaling.cpus_per_worker=0.5",
    "scaling.torch_threads=1",
]


# ---- data and model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_finetune_data(tmp_path_factory.mktemp("ft-data"))


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory) -> Path:
    """A randomly initialised decoder with PRS prefix fusion, saved as a pretraining checkpoint."""
    return write_pretrained(data, tmp_path_factory.mktemp("pretrain"))


def config(data, pretrained, labels: Path, storage: Path, name: str, *overrides: str) -> FinetuneConfig:
    cfg = load_config(FinetuneConfig, CONFIG, FAST + list(overrides))
    cfg.data.dir, cfg.data.labels, cfg.model.pretrained = str(data.root), str(labels), str(pretrained)
    cfg.run.storage_path, cfg.run.name = str(storage), name
    return cfg


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ft-runs")


@pytest.fixture(scope="module")
def probe(ray_cluster, data, pretrained, storage, mlflow_server):
    """Linear probe on PRS labels, run through run_finetune; returns (config, summary, labels)."""
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
        f"mlflow.tracking_uri={mlflow_server}",
    )
    return cfg, run_finetune(cfg), labels


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


def predictions(run_dir: Path) -> pa.Table:
    return pq.read_table(run_dir / "predictions.parquet")


# ---- no Ray ---------------------------------------------------------------------------------
def test_config_validates_and_names_bad_keys():
    cfg = load_config(FinetuneConfig, CONFIG)
    assert cfg.model.mode == "linear_probe" and cfg.mlflow.experiment == "ehrfm-finetune"
    assert cfg.scaling.num_workers == 2 and not cfg.scaling.use_gpu
    with pytest.raises(ValueError, match="unfrozen_layers"):
        load_config(FinetuneConfig, CONFIG, ["model.mode=partial"])
    with pytest.raises(ValueError, match="unfrozen_layers"):
        load_config(FinetuneConfig, CONFIG, ["model.unfrozen_layers=1"])
    with pytest.raises(ValueError, match="head_lrr"):
        load_config(FinetuneConfig, CONFIG, ["optim.head_lrr=1"])


def test_pretrained_resolves_from_run_dir_summary_or_newest_checkpoint(tmp_path, pretrained):
    from ehrfm.transfer.finetune import resolve_pretrained

    run = pretrained.parent
    assert resolve_pretrained(pretrained) == pretrained
    assert resolve_pretrained(run) == pretrained  # newest checkpoint_* (the only one)
    (run / "pretrain_result.json").write_text(json.dumps({"checkpoint": str(pretrained)}))
    assert resolve_pretrained(run) == pretrained
    with pytest.raises(FileNotFoundError, match="checkpoint_"):
        resolve_pretrained(tmp_path)


def test_model_from_other_data_or_one_class_split_is_refused(tmp_path, data, pretrained):
    from ehrfm.transfer.finetune import prepare_finetune

    other = ModelConfig(
        vocab_size=data.vocab_size + 5,
        num_pgs=data.num_pgs,
        hidden=32,
        layers=1,
        heads=4,
        context=32,
        fusion="prefix",
        prs_tokens=2,
        prs_hidden=32,
    )
    save_model_files(tmp_path / "other", EHRDecoder(other).state_dict(), other)
    labels = make_labels(data, tmp_path / "labels.parquet", "prs")
    with pytest.raises(ValueError, match="vocab_size=45"):
        prepare_finetune(config(data, tmp_path / "other", tmp_path / "labels.parquet", tmp_path, "x"))
    pq.write_table(
        labels.set_column(2, "boolean_value", pa.array([False] * labels.num_rows)), tmp_path / "negatives.parquet"
    )
    with pytest.raises(ValueError, match="split has 0 positives"):
        prepare_finetune(config(data, pretrained, tmp_path / "negatives.parquet", tmp_path, "x"))


def test_labels_are_made_from_events_when_none_are_given(tmp_path):
    from ehrfm.schemas import EVENT_SCHEMA
    from ehrfm.transfer.finetune import label_on_the_fly

    def day(d):
        return int(d) * DAY_US

    rows = []  # (subject, day, code, visit): 1 gets T2D after its visits, 2 never does, 3 has one visit
    for subject, t2d in ((1, True), (2, False)):
        rows += [(subject, 100, "VISIT/9202", 1), (subject, 200, "VISIT/9202", 2), (subject, 1200, "VISIT/9202", 3)]
        if t2d:
            rows.append((subject, 500, "CONDITION/201826", None))
    rows.append((3, 100, "VISIT/9202", 1))
    events = pa.table(
        {
            "subject_id": [r[0] for r in rows],
            "time": pa.array([day(r[1]) for r in rows], pa.timestamp("us")),
            "code": [r[2] for r in rows],
            "numeric_value": pa.array([None] * len(rows), pa.float32()),
            "visit_id": pa.array([r[3] for r in rows], pa.int64()),
            "visit_type": pa.array([None] * len(rows), pa.string()),
        },
        schema=EVENT_SCHEMA,
    )
    (tmp_path / "events").mkdir()
    pq.write_table(events.filter(pc.less(events["subject_id"], 3)), tmp_path / "events" / "part-00000.parquet")
    pq.write_table(events.filter(pc.equal(events["subject_id"], 3)), tmp_path / "events" / "part-00001.parquet")
    cfg = load_config(FinetuneConfig, CONFIG, [f"data.dir={tmp_path}", f"run.storage_path={tmp_path / 'runs'}"])
    labels = label_on_the_fly(cfg)
    assert dict(zip(labels["subject_id"].to_pylist(), labels["boolean_value"].to_pylist())) == {1: True, 2: False}
    written = Path(cfg.run_dir()) / "labels"
    assert pq.read_table(written / "labels.parquet").equals(labels)
    account = json.loads((written / "account.json").read_text())
    assert (account["persons_in"], account["labeled"], account["excluded"]["too_few_visits"]) == (3, 2, 1)


def test_modality_dropout_masks_only_the_genotyped_at_the_given_rate():
    from ehrfm.transfer.finetune_loop import drop_modality

    has_prs = torch.arange(20_000) % 4 != 0
    dropped = drop_modality(has_prs, 0.3, torch.Generator().manual_seed(1))
    assert not dropped[~has_prs].any()
    assert dropped[has_prs].float().mean().item() == pytest.approx(0.7, abs=0.02)


@pytest.mark.parametrize("mode, layers", [("linear_probe", 0), ("partial", 1), ("full", 0)])
def test_mode_decides_what_trains_and_at_which_learning_rate(data, pretrained, tmp_path, mode, layers):
    from ehrfm.transfer.finetune_loop import build_optimizer, build_risk_model

    cfg = config(
        data,
        pretrained,
        tmp_path / "none.parquet",
        tmp_path,
        "x",
        f"model.mode={mode}",
        f"model.unfrozen_layers={layers}",
        "optim.head_lr=0.01",
        "optim.backbone_lr=0.001",
    )
    model = build_risk_model(cfg)
    assert model.decoder.prs_encoder.modality_dropout == 0.0  # dropout is applied to has_prs by the loop
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    decoder = {n for n, _ in model.named_parameters() if n.startswith("decoder.")}
    assert {n for n in trainable if n.startswith("head.")} == {"head.linear.weight", "head.linear.bias"}
    if mode == "linear_probe":
        assert not trainable & decoder
    elif mode == "full":
        assert decoder <= trainable
    else:  # the top block, the final norm and the PRS encoder; not the lower block or the embeddings
        assert any(n.startswith("decoder.blocks.1.") for n in trainable)
        assert not any(n.startswith(("decoder.blocks.0.", "decoder.tok_emb")) for n in trainable)
    optimizer = build_optimizer(model, cfg)
    by_lr: dict[float, int] = {}
    for group in optimizer.param_groups:
        by_lr[group["lr"]] = by_lr.get(group["lr"], 0) + sum(p.numel() for p in group["params"])
    assert by_lr.pop(0.01) == sum(p.numel() for p in model.head.parameters())
    assert by_lr.get(0.001, 0) == sum(p.numel() for p in model.decoder.parameters() if p.requires_grad)


def test_masking_the_prs_changes_only_genotyped_logits(data, pretrained, tmp_path):
    from ehrfm.transfer.examples import build_examples
    from ehrfm.transfer.finetune import predict_examples
    from ehrfm.transfer.finetune_loop import build_risk_model

    labels = make_labels(data, tmp_path / "labels.parquet", "token")
    examples = build_examples(data.root, labels, 32).slice(0, 240)
    cfg = config(data, pretrained, tmp_path / "labels.parquet", tmp_path, "x", "model.mode=full")
    given, masked = predict_examples(build_risk_model(cfg).eval(), examples, batch_size=100)
    has = examples["has_prs"].to_numpy(zero_copy_only=False)
    assert has.sum() > 100 and (~has).sum() > 40
    np.testing.assert_array_equal(given[~has], masked[~has])
    assert (np.abs(given[has] - masked[has]) > 1e-6).all()


def test_platt_fit_maps_logits_to_calibrated_probabilities():
    from ehrfm.calibration import fit_platt

    rng = np.random.default_rng(0)
    logits = rng.normal(size=20_000)
    labels = rng.random(20_000) < 1 / (1 + np.exp(-(0.5 * logits - 1.0)))  # true map: a=0.5, b=-1
    a, b = fit_platt(logits, labels)
    assert a == pytest.approx(0.5, abs=0.05) and b == pytest.approx(-1.0, abs=0.05)


def test_oversampling_repeats_positives_to_balance():
    from ehrfm.transfer.finetune import oversample_positives

    table = pa.table({"label": [True] + [False] * 9, "i": list(range(10))})
    out = oversample_positives(table)
    assert out.num_rows == 18 and pc.sum(out["label"]).as_py() == 9
    assert sorted(set(out["i"].to_pylist())) == list(range(10))


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
    initial = build_risk_model(resolved).head.state_dict()  # the seeded head before training
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
    assert (
        spec.context == 32 and spec.tokenizer_version == "factory-1" and spec.head_inputs == "last+mean+prs"
    )  # the shipped default
    table = predictions(run_dir)
    examples = build_examples(data.root, labels, spec.context)
    val = examples.filter(pc.equal(examples["split"], "val"))
    logit, masked = predict_examples(model, val, batch_size=50)
    np.testing.assert_allclose(
        logit, table.filter(pc.equal(table["split"], "val"))["logit"].to_numpy(), rtol=1e-5, atol=1e-6
    )
    best = json.loads((run_dir / "finetune_result.json").read_text())["best_checkpoint"]
    again, _ = load_risk_model(best)  # the best epoch's checkpoint holds the same weights
    np.testing.assert_allclose(predict_examples(again, val)[1], masked, rtol=1e-5, atol=1e-6)
