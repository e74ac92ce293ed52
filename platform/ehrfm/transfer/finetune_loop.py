"""The per-worker fine-tuning loop that Ray Train runs on every rank, on the training engine it
shares with pretraining (`ehrfm.training.engine`: DeepSpeed ZeRO, stage 2 by default, over gloo
on CPU). The engine averages and clips the gradients and steps AdamW; a step does no host sync
(the loss accumulates in a device tensor, read once per epoch).

Each epoch: one pass over this worker's shard of the train examples, then validation AUROC over
*all* validation examples, with the PRS as given and with the PRS masked (same weights). The val
dataset is not split by Ray: every rank reads it and scores the rows whose subject_id % world ==
rank, and the (label, logit) pairs are gathered to every rank with all_gather_object, so each
rank reports the same exact AUROC (what a Tune scheduler needs) at 1/world of the forward cost.

Modality dropout is applied here, to has_prs itself, so the decoder's trunk and the head's PRS
summary see the same mask (the decoder's own prs_encoder dropout is set to 0 when the model is
built). Each epoch's checkpoint goes through `ehrfm.training.checkpoint`: every rank writes its
DeepSpeed shard, rank 0 adds the risk-model directory files and train_state.json ({"epoch",
"history", ...}); Ray keeps the best by val_auroc. A restarted worker group restores the engine
(weights, optimiser, LR schedule) from the latest one and resumes after its epoch.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa
import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ray.data.collate_fn import ArrowBatchCollateFn

from ehrfm.config import dump_config
from ehrfm.metrics import auroc
from ehrfm.model.io import load_model_config, load_state_dict
from ehrfm.model.risk import HeadSpec, RiskModel, predict_logits, save_risk_files
from ehrfm.model.transformer import EHRDecoder
from ehrfm.model.value_bins import ValueBinReadout
from ehrfm.training.checkpoint import TrainState, report_checkpoint, resume
from ehrfm.training.engine import WarmupCosine, initialize_engine, parameter_groups
from ehrfm.training.engine import build_optimizer as engine_optimizer
from ehrfm.training.launch import worker_setup
from ehrfm.training.run_logger import RunLogger, open_run_logger
from ehrfm.transfer.examples import example_tensors
from ehrfm.transfer.finetune_config import FinetuneConfig


class ExampleCollate(ArrowBatchCollateFn):
    """Arrow batch of examples -> model tensors; with `world` > 1 only the rows of subjects
    whose id % world == rank (each rank's fixed share of an unsplit dataset)."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        if self.world > 1:
            ids = batch.column("subject_id").to_numpy()
            batch = batch.filter(pa.array(ids % self.world == self.rank))
        return example_tensors(batch)


def build_risk_model(cfg: FinetuneConfig, value_readout: ValueBinReadout | None = None) -> RiskModel:
    """Pretrained decoder + fresh head (seeded: the same on every rank), trainable per the mode;
    `value_readout`: the head also reads the window's value bins (the head spec's)."""
    directory = cfg.model.pretrained
    decoder_cfg = dataclasses.replace(load_model_config(directory), modality_dropout=0.0, adapter=False)
    torch.manual_seed(cfg.train.seed)
    decoder = EHRDecoder(decoder_cfg)
    decoder.load_state_dict(load_state_dict(directory))
    model = RiskModel(decoder, cfg.model.head_inputs, cfg.model.head_dropout, value_readout)
    if cfg.model.mode == "full":
        for param in model.parameters():
            param.requires_grad = True
    else:
        model.freeze_decoder(cfg.model.unfrozen_layers)
    return model


def optimizer_groups(model: RiskModel, cfg: FinetuneConfig) -> list[dict]:
    """The head at head_lr and the decoder's trainable parameters at backbone_lr (the shared
    builder: weight decay on matrices only, frozen parameters left out)."""
    parts = {"head": (model.head, cfg.optim.head_lr), "decoder": (model.decoder, cfg.optim.backbone_lr)}
    return parameter_groups(parts, cfg.optim.weight_decay)


def build_optimizer(model: RiskModel, cfg: FinetuneConfig) -> torch.optim.AdamW:
    """The AdamW the engine wraps for this model (the loop hands the groups to `initialize_engine`)."""
    return engine_optimizer(optimizer_groups(model, cfg), cfg.engine_spec())


def drop_modality(has_prs: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """has_prs with a `rate` share of the genotyped shown as non-genotyped."""
    if rate <= 0:
        return has_prs
    keep = torch.rand(has_prs.shape, generator=generator) >= rate
    return has_prs & keep.to(has_prs.device)


def train_epoch(engine, core: RiskModel, shard, cfg: FinetuneConfig, epoch: int, rank: int) -> tuple[float, int]:
    """One pass over this worker's shard: (example-weighted mean loss over all ranks, steps)."""
    sched = cfg.train
    engine.train()
    if cfg.model.mode == "linear_probe":
        core.decoder.eval()  # frozen features: no dropout noise in them
    torch.manual_seed(sched.seed * 1_000_003 + epoch * 131 + rank)
    generator = torch.Generator().manual_seed(sched.seed * 7919 + epoch * 104_729 + rank)
    device = engine.device
    pos_weight = None
    if sched.imbalance == "pos_weight" and sched.pos_weight:
        pos_weight = torch.tensor(sched.pos_weight, device=device)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss * examples, examples
    steps = 0
    shuffle = sched.shuffle_buffer if sched.shuffle_buffer >= sched.batch_size else None
    for batch in shard.iter_torch_batches(
        batch_size=sched.batch_size,
        collate_fn=ExampleCollate(),
        drop_last=False,
        local_shuffle_buffer_size=shuffle,
        local_shuffle_seed=(sched.seed * 1000 + epoch) if shuffle else None,
    ):
        has_prs = drop_modality(batch["has_prs"], sched.modality_dropout, generator)
        logits = engine(batch["tokens"], batch["ages"], batch["length"], batch["prs"], has_prs)
        loss = F.binary_cross_entropy_with_logits(logits.float(), batch["label"].float(), pos_weight=pos_weight)
        engine.backward(loss)
        engine.step()
        totals[0] += loss.detach().double() * len(logits)
        totals[1] += len(logits)
        steps += 1
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, examples = totals.tolist()  # the epoch's one host sync
    return (loss_sum / examples if examples > 0 else math.nan), steps


@torch.no_grad()
def score_validation(core: RiskModel, shard, batch_size: int, rank: int, world: int) -> dict[str, np.ndarray]:
    """Labels and logits (PRS as given, PRS masked) of every val example, gathered from all ranks."""
    core.eval()
    parts: dict[str, list[np.ndarray]] = {"label": [], "logit": [], "logit_prs_masked": []}
    for batch in shard.iter_torch_batches(
        batch_size=batch_size, collate_fn=ExampleCollate(rank, world), drop_last=False
    ):
        if len(batch["label"]) == 0:
            continue
        parts["label"].append(batch["label"].cpu().numpy())
        parts["logit"].append(predict_logits(core, batch).float().cpu().numpy())
        parts["logit_prs_masked"].append(predict_logits(core, batch, mask_prs=True).float().cpu().numpy())
    mine = {k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in parts.items()}
    if not (dist.is_initialized() and world > 1):
        return mine
    gathered: list[dict | None] = [None] * world
    dist.all_gather_object(gathered, mine)
    return {k: np.concatenate([g[k] for g in gathered]) for k in mine}


def report_epoch(engine, spec: HeadSpec, tokenizer: str, state: TrainState, metrics: dict, rank: int) -> None:
    """ray.train.report from every rank with its DeepSpeed shard; rank 0 adds the epoch's
    risk-model directory (what finalize_run and the sweep read) and train_state.json."""

    def write_model(directory, weights) -> None:
        save_risk_files(directory, weights, engine.module.decoder.cfg, spec, tokenizer)

    name = f"checkpoint_epoch{int(metrics['epoch']):04d}"
    report_checkpoint(engine, state, metrics, rank, write_model, name)


def open_logger(loop_config: dict, cfg: FinetuneConfig, core: RiskModel, rank: int, world: int) -> RunLogger | None:
    params = {
        "config": cfg.model_dump(mode="json"),
        "world_size": world,
        "model.parameters": sum(p.numel() for p in core.parameters()),
        "model.trainable_parameters": sum(p.numel() for p in core.parameters() if p.requires_grad),
        "examples": loop_config.get("counts", {}),
    }
    return open_run_logger(
        loop_config,
        rank,
        cfg.mlflow.experiment,
        cfg.run_dir(),
        cfg.run.name,
        params,
        dump_config(cfg),
        "finetune_config.yaml",
    )


def finetune_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point. loop_config: "config" (a resolved FinetuneConfig dump: pretrained is a
    checkpoint dir, data.context set), "spec" (HeadSpec JSON without calibration), "tokenizer"
    (path), "tracking_uri" (None: no MLflow), "artifact_root", "counts" (examples per split)."""
    cfg = FinetuneConfig.model_validate(loop_config["config"])
    spec = HeadSpec.from_json(loop_config["spec"])
    rank, world = worker_setup(cfg.scaling)

    core = build_risk_model(cfg, spec.value_readout())
    # constant LR: the shared schedule with no warmup and a floor of 1
    engine, _ = initialize_engine(core, optimizer_groups(core, cfg), cfg.engine_spec(), WarmupCosine.constant(), world)
    state = resume(engine) or TrainState()
    logger = open_logger(loop_config, cfg, core, rank, world)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    try:
        for epoch in range(state.epoch, cfg.train.epochs):
            train_loss, steps = train_epoch(engine, core, train_shard, cfg, epoch, rank)
            scored = score_validation(core, val_shard, cfg.train.eval_batch_size, rank, world)
            metrics = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "val_auroc": auroc(scored["label"], scored["logit"]),
                "val_auroc_prs_masked": auroc(scored["label"], scored["logit_prs_masked"]),
                "val_examples": int(len(scored["label"])),
            }
            state.epoch, state.step = epoch + 1, state.step + steps
            state.history.append(metrics)
            if logger:
                logger.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, epoch + 1)
            report_epoch(engine, spec, loop_config["tokenizer"], state, metrics, rank)
    except BaseException:
        if logger:
            logger.finish("FAILED")
        raise
    if logger:
        logger.finish("FINISHED")
