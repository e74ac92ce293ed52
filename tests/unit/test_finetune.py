"""Fine-tuning without Ray: config validation, resolving the pretrained checkpoint, the modes' trainable
parameters and learning rates, PRS masking, Platt fit, oversampling, labels made on the fly; on the data and
tiny decoder of tests/support/finetune_factory.py (the Ray Train runs: tests/integration, tests/e2e)."""

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
from ehrfm.model.io import save_model_files
from ehrfm.model.transformer import EHRDecoder
from ehrfm.transfer.finetune_config import FinetuneConfig
from tests.support.finetune_factory import DAY_US, make_labels, write_finetune_data, write_pretrained
from tests.support.finetune_setup import CONFIG, config


# ---- data and model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_finetune_data(tmp_path_factory.mktemp("ft-data"))


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory) -> Path:
    """A randomly initialised decoder with PRS prefix fusion, saved as a pretraining checkpoint."""
    return write_pretrained(data, tmp_path_factory.mktemp("pretrain"))


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
    # older windows reach the head only through its mean pooling
    with pytest.raises(ValueError, match=r"history_windows=4 .* needs '\+mean'"):
        load_config(FinetuneConfig, CONFIG, ["data.history_windows=4", "model.head_inputs=last+prs"])
    assert load_config(FinetuneConfig, CONFIG, ["data.history_windows=4"]).data.history_windows == 4


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
