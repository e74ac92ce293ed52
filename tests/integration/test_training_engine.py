"""The one training engine (`ehrfm.training.engine`) under both jobs: pretraining and fine-tuning take
their optimiser groups, schedule and DeepSpeed config from the same functions, and a full fine-tune
runs on DeepSpeed ZeRO-2 through Ray Train (2 CPU workers, gloo), checkpoints through the shared
checkpoint code and resumes from it. Tiny data from tests/support/finetune_factory.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ehrfm.config import load_config
from ehrfm.metrics import auroc
from ehrfm.model.io import load_state_dict
from ehrfm.model.risk import load_risk_model
from ehrfm.model.transformer import EHRDecoder
from ehrfm.training import engine, pretrain_loop
from ehrfm.training.checkpoint import DEEPSPEED_DIR, DEEPSPEED_SAFE_GLOBALS, DEEPSPEED_TAG, STATE_FILE
from ehrfm.training.config import PretrainConfig
from ehrfm.transfer import finetune_loop
from ehrfm.transfer.finetune_config import FinetuneConfig
from tests.support.finetune_factory import make_labels, write_finetune_data, write_pretrained

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
FAST = [
    "train.batch_size=16",
    "train.shuffle_buffer=64",
    "train.eval_batch_size=64",
    "scaling.num_workers=2",
    "scaling.cpus_per_worker=0.5",
    "scaling.torch_threads=1",
    "mlflow.enabled=false",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_finetune_data(tmp_path_factory.mktemp("engine-data"), persons=300)


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory) -> Path:
    return write_pretrained(data, tmp_path_factory.mktemp("engine-pretrain"))


def finetune_config(data, pretrained, labels: Path, storage: Path, *overrides: str) -> FinetuneConfig:
    cfg = load_config(FinetuneConfig, CONFIGS / "finetune-t2d.yaml", FAST + list(overrides))
    cfg.data.dir, cfg.data.labels, cfg.model.pretrained = str(data.root), str(labels), str(pretrained)
    cfg.run.storage_path, cfg.run.name = str(storage), "full-zero2"
    return cfg


def ds_model_states(checkpoint: Path) -> dict:
    """DeepSpeed's module/engine file of a checkpoint, read the safe way (weights_only)."""
    path = checkpoint / DEEPSPEED_DIR / DEEPSPEED_TAG / "mp_rank_00_model_states.pt"
    with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


# ---- one optimiser-group builder, one schedule, one DeepSpeed config (no Ray) ------------------
def test_pretraining_and_fine_tuning_build_their_optimizer_groups_with_one_function(data, pretrained, tmp_path):
    assert pretrain_loop.parameter_groups is finetune_loop.parameter_groups is engine.parameter_groups
    assert pretrain_loop.initialize_engine is finetune_loop.initialize_engine is engine.initialize_engine

    pre_cfg = load_config(PretrainConfig, CONFIGS / "pretrain-cpu-small.yaml", ["optim.lr=0.002"])
    decoder = EHRDecoder(pre_cfg.model.with_data(data.vocab_size, data.num_pgs))
    groups = pretrain_loop.optimizer_groups(decoder, pre_cfg)
    assert [g["name"] for g in groups] == ["model.decay", "model.no_decay"]
    assert all(g["lr"] == 0.002 for g in groups)
    assert [g["weight_decay"] for g in groups] == [pre_cfg.optim.weight_decay, 0.0]
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and all(p.dim() < 2 for p in groups[1]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(decoder.parameters()))

    for mode, layers in (("full", 0), ("partial", 1), ("linear_probe", 0)):
        cfg = finetune_config(
            data,
            pretrained,
            tmp_path / "none.parquet",
            tmp_path,
            f"model.mode={mode}",
            f"model.unfrozen_layers={layers}",
            "optim.head_lr=0.01",
            "optim.backbone_lr=0.001",
            "optim.weight_decay=0.05",
        )
        model = finetune_loop.build_risk_model(cfg)
        groups = finetune_loop.optimizer_groups(model, cfg)
        by_name = {g["name"]: g for g in groups}
        expected = ["head.decay", "head.no_decay"] + (
            [] if mode == "linear_probe" else ["decoder.decay", "decoder.no_decay"]
        )
        assert list(by_name) == expected, mode
        assert {g["lr"] for n, g in by_name.items() if n.startswith("head.")} == {0.01}
        assert {g["lr"] for n, g in by_name.items() if n.startswith("decoder.")} <= {0.001}
        assert [g["weight_decay"] for g in groups] == [0.05, 0.0] * (len(groups) // 2)
        grouped = [p for g in groups for p in g["params"]]
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
        assert all(p.dim() >= 2 for n, g in by_name.items() if n.endswith(".decay") for p in g["params"])
        # what the engine wraps: one torch AdamW over exactly these groups
        optimizer = finetune_loop.build_optimizer(model, cfg)
        assert [g["name"] for g in optimizer.param_groups] == expected

    # the fine-tune's constant LR is the shared WarmupCosine with no warmup and a floor of 1
    constant = engine.WarmupCosine.constant()
    assert {constant(step) for step in range(0, 5000, 7)} == {1.0}
    # the same DeepSpeed config builder, ZeRO-2 by default for the fine-tune
    ds = engine.deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == cfg.optim.grad_clip
    assert ds["train_batch_size"] == cfg.train.batch_size * 2 and ds["bf16"]["enabled"] is False
    with pytest.raises(ValueError, match="bf16"):
        finetune_config(data, pretrained, tmp_path / "none.parquet", tmp_path, "deepspeed.precision=bf16")


# ---- a full fine-tune on ZeRO-2 through Ray Train ------------------------------------------------
@pytest.fixture(scope="module")
def full_zero2(ray_cluster, data, pretrained, tmp_path_factory):
    """A full fine-tune (2 epochs, 2 workers, ZeRO-2) through run_finetune; (config, summary, storage)."""
    from ehrfm.transfer.finetune import run_finetune

    storage = tmp_path_factory.mktemp("engine-runs")
    labels = storage / "token_labels.parquet"
    make_labels(data, labels, "token")
    cfg = finetune_config(
        data,
        pretrained,
        labels,
        storage,
        "model.mode=full",
        "deepspeed.zero_stage=2",
        "optim.head_lr=0.01",
        "optim.backbone_lr=0.003",
        "train.epochs=2",
    )
    return cfg, run_finetune(cfg), storage


@pytest.mark.ray
def test_full_fine_tune_on_zero2_finishes_and_its_best_epoch_loads_and_scores(full_zero2, data, pretrained):
    from ehrfm.transfer.examples import build_examples, read_labels
    from ehrfm.transfer.finetune import predict_examples

    cfg, summary, storage = full_zero2
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    best = Path(summary["best_checkpoint"])
    # the shared checkpoint: both ranks' ZeRO-2 shards, rank 0's risk-model files and loop state
    shards = sorted(p.name for p in (best / DEEPSPEED_DIR / DEEPSPEED_TAG).glob("*optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert ds_model_states(best)["ds_config"]["zero_optimization"]["stage"] == 2
    assert not (best / "optimizer.pt").exists()
    state = json.loads((best / STATE_FILE).read_text())
    assert state["epoch"] == summary["metrics"]["best_epoch"] and len(state["history"]) == state["epoch"]
    weights = torch.load(best / "model.pt", map_location="cpu", weights_only=True)
    assert {k.split(".")[0] for k in weights} == {"decoder", "head"}
    base = load_state_dict(pretrained)
    changed = [k for k, v in base.items() if not torch.equal(weights[f"decoder.{k}"], v)]
    assert len(changed) > len(base) // 2  # full mode: the decoder trained, not only the head

    model, spec = load_risk_model(best)
    examples = build_examples(data.root, read_labels(str(storage / "token_labels.parquet")), spec.context)
    logits, masked = predict_examples(model, examples, batch_size=128)
    assert len(logits) == examples.num_rows and np.isfinite(logits).all() and np.isfinite(masked).all()
    assert auroc(examples["label"].to_numpy(zero_copy_only=False), logits) > 0.6
    # the calibrated model finalize_run wrote is this epoch's weights
    final, _ = load_risk_model(summary["model_dir"])
    for key, value in final.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


@pytest.mark.ray
def test_a_rerun_restores_the_engine_state_and_continues(full_zero2, data):
    """The same run started again with one more epoch: weights, optimiser and LR schedule come back
    from the DeepSpeed checkpoint (its step counters carry on), and the first epochs are kept."""
    from ehrfm.transfer.finetune import build_finetune_trainer, prepare_finetune

    cfg, summary, _ = full_zero2
    latest_before = sorted(Path(summary["run_dir"]).glob("checkpoint_epoch*"))[-1]
    steps_before = ds_model_states(latest_before)["global_steps"]
    assert steps_before == json.loads((latest_before / STATE_FILE).read_text())["step"] > 0

    longer = cfg.model_copy(deep=True)
    longer.train.epochs = 3
    longer, prepared = prepare_finetune(longer)
    result = build_finetune_trainer(longer, prepared.ray_datasets(longer), data=prepared).fit()
    latest = Path(result.checkpoint.path)
    state = json.loads((latest / STATE_FILE).read_text())
    assert state["epoch"] == 3 and state["restarts"] == 1
    assert state["history"][:2] == summary["history"]
    engine_state = ds_model_states(latest)
    per_epoch = steps_before // 2
    assert engine_state["global_steps"] == state["step"] == steps_before + per_epoch
    assert engine_state["lr_scheduler"]["last_epoch"] == state["step"]  # the schedule was restored, too
