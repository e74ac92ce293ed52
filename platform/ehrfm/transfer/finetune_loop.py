"""The per-worker fine-tuning loop that Ray Train runs on every rank (DDP over gloo on CPU).

Each epoch: one pass over this worker's shard of the train examples, then validation AUROC over
*all* validation examples, with the PRS as given and with the PRS masked (same weights). The val
dataset is not split by Ray: every rank reads it and scores the rows whose subject_id % world ==
rank, and the (label, logit) pairs are gathered to every rank with all_gather_object, so each
rank reports the same exact AUROC (what a Tune scheduler needs) at 1/world of the forward cost.

Modality dropout is applied here, to has_prs itself, so the decoder's trunk and the head's PRS
summary see the same mask (the decoder's own prs_encoder dropout is set to 0 when the model is
built). Rank 0 writes the epoch's risk-model directory as the checkpoint; Ray keeps the best by
val_auroc. A restarted worker group resumes after the last reported epoch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ray.data.collate_fn import ArrowBatchCollateFn

from ehrfm.config import dump_config
from ehrfm.metrics import auroc
from ehrfm.model.io import WEIGHTS_FILE, load_model_config, load_state_dict
from ehrfm.model.risk import HeadSpec, RiskModel, predict_logits, save_risk_model
from ehrfm.model.transformer import EHRDecoder
from ehrfm.training.run_logger import RunLogger
from ehrfm.transfer.examples import example_tensors
from ehrfm.transfer.finetune_config import FinetuneConfig

OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "train_state.json"


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


def build_risk_model(cfg: FinetuneConfig) -> RiskModel:
    """Pretrained decoder + fresh head (seeded: the same on every rank), trainable per the mode."""
    directory = cfg.model.pretrained
    decoder_cfg = dataclasses.replace(load_model_config(directory), modality_dropout=0.0, adapter=False)
    torch.manual_seed(cfg.train.seed)
    decoder = EHRDecoder(decoder_cfg)
    decoder.load_state_dict(load_state_dict(directory))
    model = RiskModel(decoder, cfg.model.head_inputs, cfg.model.head_dropout)
    if cfg.model.mode == "full":
        for param in model.parameters():
            param.requires_grad = True
    else:
        model.freeze_decoder(cfg.model.unfrozen_layers)
    return model


def build_optimizer(model: RiskModel, cfg: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW with the head and the decoder at their own learning rates; no decay on vectors."""
    groups = []
    for module, lr in ((model.head, cfg.optim.head_lr), (model.decoder, cfg.optim.backbone_lr)):
        params = [p for p in module.parameters() if p.requires_grad]
        for decay, chosen in (
            (cfg.optim.weight_decay, [p for p in params if p.ndim >= 2]),
            (0.0, [p for p in params if p.ndim < 2]),
        ):
            if chosen:
                groups.append({"params": chosen, "lr": lr, "weight_decay": decay})
    return torch.optim.AdamW(groups)


def drop_modality(has_prs: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """has_prs with a `rate` share of the genotyped shown as non-genotyped."""
    if rate <= 0:
        return has_prs
    keep = torch.rand(has_prs.shape, generator=generator) >= rate
    return has_prs & keep.to(has_prs.device)


def train_epoch(model, core: RiskModel, shard, cfg: FinetuneConfig, optimizer, epoch: int, rank: int) -> float:
    """One pass over this worker's shard; the example-weighted mean loss over all ranks."""
    sched = cfg.train
    model.train()
    if cfg.model.mode == "linear_probe":
        core.decoder.eval()  # frozen features: no dropout noise in them
    torch.manual_seed(sched.seed * 1_000_003 + epoch * 131 + rank)
    generator = torch.Generator().manual_seed(sched.seed * 7919 + epoch * 104_729 + rank)
    pos_weight = torch.tensor(sched.pos_weight) if sched.imbalance == "pos_weight" and sched.pos_weight else None
    trainable = [p for p in core.parameters() if p.requires_grad]
    totals = torch.zeros(2, dtype=torch.float64)
    shuffle = sched.shuffle_buffer if sched.shuffle_buffer >= sched.batch_size else None
    for batch in shard.iter_torch_batches(
        batch_size=sched.batch_size,
        collate_fn=ExampleCollate(),
        drop_last=False,
        local_shuffle_buffer_size=shuffle,
        local_shuffle_seed=(sched.seed * 1000 + epoch) if shuffle else None,
    ):
        has_prs = drop_modality(batch["has_prs"], sched.modality_dropout, generator)
        logits = model(batch["tokens"], batch["ages"], batch["length"], batch["prs"], has_prs)
        loss = F.binary_cross_entropy_with_logits(logits, batch["label"], pos_weight=pos_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)
        optimizer.step()
        totals += torch.tensor([loss.item() * len(logits), len(logits)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else math.nan


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
        parts["label"].append(batch["label"].numpy())
        parts["logit"].append(predict_logits(core, batch).numpy())
        parts["logit_prs_masked"].append(predict_logits(core, batch, mask_prs=True).numpy())
    mine = {k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in parts.items()}
    if not (dist.is_initialized() and world > 1):
        return mine
    gathered: list[dict | None] = [None] * world
    dist.all_gather_object(gathered, mine)
    return {k: np.concatenate([g[k] for g in gathered]) for k in mine}


def restore(core: RiskModel, optimizer, checkpoint) -> dict:
    """Weights, optimiser and loop state from an epoch checkpoint; returns the loop state."""
    with checkpoint.as_directory() as directory:
        directory = Path(directory)
        core.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True))
        optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
        return json.loads((directory / STATE_FILE).read_text())


def report_epoch(
    core: RiskModel, optimizer, spec: HeadSpec, tokenizer: str, state: dict, metrics: dict, rank: int
) -> None:
    """ray.train.report from every rank; rank 0 attaches the epoch's risk-model directory."""
    name = f"checkpoint_epoch{int(metrics['epoch']):04d}"
    if rank != 0:
        ray.train.report(metrics, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory(prefix="ehrfm-ft-") as tmp:
        save_risk_model(tmp, core, spec, tokenizer)
        torch.save(optimizer.state_dict(), Path(tmp) / OPTIMIZER_FILE)
        (Path(tmp) / STATE_FILE).write_text(json.dumps(state, indent=1))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)


def open_logger(loop_config: dict, cfg: FinetuneConfig, core: RiskModel, world: int) -> RunLogger:
    logger = RunLogger(
        loop_config["tracking_uri"],
        cfg.mlflow.experiment,
        cfg.run_dir(),
        cfg.run.name,
        loop_config.get("artifact_root"),
    )
    logger.log_params(
        {
            "config": cfg.model_dump(mode="json"),
            "world_size": world,
            "model.parameters": sum(p.numel() for p in core.parameters()),
            "model.trainable_parameters": sum(p.numel() for p in core.parameters() if p.requires_grad),
            "examples": loop_config.get("counts", {}),
        }
    )
    if not logger.resumed:
        logger.log_text(dump_config(cfg), "finetune_config.yaml")
    return logger


def finetune_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point. loop_config: "config" (a resolved FinetuneConfig dump: pretrained is a
    checkpoint dir, data.context set), "spec" (HeadSpec JSON without calibration), "tokenizer"
    (path), "tracking_uri" (None: no MLflow), "artifact_root", "counts" (examples per split)."""
    cfg = FinetuneConfig.model_validate(loop_config["config"])
    spec = HeadSpec.from_json(loop_config["spec"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if cfg.scaling.torch_threads:
        torch.set_num_threads(cfg.scaling.torch_threads)

    core = build_risk_model(cfg)
    optimizer = build_optimizer(core, cfg)
    state: dict = {"epoch": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = restore(core, optimizer, checkpoint)
    model = ray.train.torch.prepare_model(core)

    logger = None
    if rank == 0 and loop_config.get("tracking_uri"):
        logger = open_logger(loop_config, cfg, core, world)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    try:
        for epoch in range(state["epoch"], cfg.train.epochs):
            train_loss = train_epoch(model, core, train_shard, cfg, optimizer, epoch, rank)
            scored = score_validation(core, val_shard, cfg.train.eval_batch_size, rank, world)
            metrics = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "val_auroc": auroc(scored["label"], scored["logit"]),
                "val_auroc_prs_masked": auroc(scored["label"], scored["logit_prs_masked"]),
                "val_examples": int(len(scored["label"])),
            }
            state = {"epoch": epoch + 1, "history": state["history"] + [metrics]}
            if logger:
                logger.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, epoch + 1)
            report_epoch(core, optimizer, spec, loop_config["tokenizer"], state, metrics, rank)
    except BaseException:
        if logger:
            logger.finish("FAILED")
        raise
    if logger:
        logger.finish("FINISHED")
