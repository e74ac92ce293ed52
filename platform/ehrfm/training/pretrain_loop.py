"""The per-worker training loop that Ray Train runs on every rank.

Ray Train has already set up the process group (gloo on CPU, NCCL on GPU); the shared engine
(`ehrfm.training.engine`, DeepSpeed ZeRO) wraps the model on top of it. A step does no host sync:
losses and token counts accumulate in device tensors and are all-reduced and read only every
`log_every` steps. Training micro-batches are packed (several persons per row, `performance.packing`)
and the loss can be fused (no [B, T, V] logits, `performance.fused_loss`); validation stays unpacked
with a summed loss, so val loss per real token is exact and comparable. Checkpoints go through `ray.train.report` (`ehrfm.training.checkpoint`); a
restarted worker group (or the same run started again) resumes from the latest one, at the same
data position.
"""

from __future__ import annotations

import math
import os
import signal
import time

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ehrfm.config import dump_config
from ehrfm.constants import PAD_ID
from ehrfm.model.config import ModelConfig
from ehrfm.model.io import load_state_dict, save_model_files
from ehrfm.model.transformer import EHRDecoder
from ehrfm.training.checkpoint import TrainState, report_checkpoint, resume
from ehrfm.training.config import PretrainConfig
from ehrfm.training.engine import WarmupCosine, initialize_engine, parameter_groups
from ehrfm.training.launch import worker_setup
from ehrfm.training.run_logger import RunLogger, open_run_logger
from ehrfm.training.throughput import WindowMeter, flops_per_token, mfu_figures, peak_flops
from ehrfm.training.windows import VALIDATION_EPOCH, hash_uniform, iter_epoch

MODEL_INPUTS = ("tokens", "ages", "prs", "has_prs")
PACKED_INPUTS = ("segment", "positions", "prefix_slot")  # present only in packed batches


class BatchStream:
    """Endless micro-batches over epochs of this worker's shard, tracking (epoch, batch in epoch)."""

    def __init__(self, shard, cfg: PretrainConfig, num_pgs: int, state: TrainState):
        self.shard, self.cfg, self.num_pgs = shard, cfg, num_pgs
        self.epoch, self.consumed = state.epoch, state.batch_in_epoch
        self._batches = self._open(skip=self.consumed)

    def _open(self, skip: int):
        data = self.cfg.data
        batches = iter(
            iter_epoch(
                self.shard,
                data.batch_size,
                self.cfg.model.context,
                self.num_pgs,
                self.cfg.schedule.seed,
                self.epoch,
                data.shuffle_buffer,
                pack_prefix=self.cfg.model.prefix_length if self.cfg.performance.packing else None,
            )
        )
        for skipped in range(skip):  # resume mid-epoch where the checkpoint left off
            if next(batches, None) is None:
                raise RuntimeError(
                    f"checkpoint says {skip} batches of epoch {self.epoch} were used, but this shard has only {skipped}"
                )
        return batches

    def next(self) -> dict[str, torch.Tensor]:
        batch = next(self._batches, None)
        if batch is None:
            self.epoch, self.consumed = self.epoch + 1, 0
            self._batches = self._open(skip=0)
            batch = next(self._batches, None)
            if batch is None:
                raise RuntimeError(
                    f"the train split gives this worker no full batch of {self.cfg.data.batch_size}: "
                    "lower data.batch_size or scaling.num_workers"
                )
        self.consumed += 1
        return batch


def validation_batches(shard, cfg: PretrainConfig, num_pgs: int, rank: int, world: int) -> list[dict]:
    """This rank's share of a fixed validation set, the same whatever order Ray Data delivers rows in.

    Every rank reads the (unsplit) val split once; the `val_max_windows` people with the smallest
    hash of their id are kept and dealt round-robin to the ranks, then cached for every evaluation.
    """
    keep = cfg.data.val_max_windows
    kept: dict[str, torch.Tensor] | None = None
    for batch in iter_epoch(
        shard,
        cfg.data.val_batch_size,
        cfg.model.context,
        num_pgs,
        cfg.schedule.seed,
        VALIDATION_EPOCH,
        shuffle_buffer=0,
        drop_last=False,
    ):
        batch = {k: v.cpu() for k, v in batch.items()}
        kept = batch if kept is None else {k: torch.cat([kept[k], batch[k]]) for k in batch}
        priority = torch.from_numpy(hash_uniform(kept["subject_id"].numpy(), cfg.schedule.seed, VALIDATION_EPOCH))
        order = torch.argsort(priority)[:keep]
        kept = {k: v[order] for k, v in kept.items()}
    if kept is None:
        raise RuntimeError("the val split is empty: pretraining needs validation timelines")
    order = torch.argsort(kept["subject_id"])  # round-robin over a fixed order
    mine = order[rank::world]
    device = ray.train.torch.get_device()
    size = cfg.data.val_batch_size
    return [{k: v[mine[i : i + size]].to(device) for k, v in kept.items()} for i in range(0, len(mine), size)]


def model_loss(engine, batch: dict[str, torch.Tensor], loss_chunk: int, reduction: str = "mean") -> torch.Tensor:
    """The model's loss on a packed or unpacked batch (the packed-batch interface of the model)."""
    packed = {k: batch[k] for k in PACKED_INPUTS if k in batch}
    _, loss = engine(
        *(batch[k] for k in MODEL_INPUTS),
        targets=batch["targets"],
        **packed,
        loss_chunk=loss_chunk,
        reduction=reduction,
    )
    return loss


def evaluate(engine, batches: list[dict], device: torch.device, loss_chunk: int = 0) -> float:
    """Mean next-token loss over all ranks' validation windows (exact token-weighted average): the
    model sums the loss (fused or from logits), the real targets are counted here."""
    engine.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in batches:
            sums[0] += model_loss(engine, batch, loss_chunk, reduction="sum").double()
            sums[1] += (batch["targets"] != PAD_ID).sum()
    dist.all_reduce(sums)
    engine.train()
    return float(sums[0] / sums[1].clamp(min=1))


def _maybe_inject_fault(cfg: PretrainConfig, rank: int, next_step: int) -> None:
    """Test hook: the chosen rank is SIGKILLed (once, guarded by a marker file) before `next_step`: the
    same death as an OOM kill or a lost node, with no chance to clean up."""
    fault = cfg.fault
    if fault.kill_rank_at_step != next_step or rank != fault.kill_rank:
        return
    marker = cfg.fault_marker()
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {rank} killed before step {next_step}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def positions_in(batch: dict[str, torch.Tensor], model_cfg: ModelConfig) -> int:
    """Sequence positions the model computes for this batch (prefix slots included), from the
    tensor shape alone (host-known, no sync): R x (prefix + context) packed, B x (prefix + T) not."""
    rows, length = batch["tokens"].shape
    return rows * (length if "segment" in batch else length + model_cfg.prefix_length)


def compile_model(engine) -> None:
    """torch.compile the module inside the DeepSpeed engine; the batch dimension is dynamic (the
    packed row count varies per batch)."""
    engine.compile(compile_kwargs={"dynamic": True})


def build_model(cfg: PretrainConfig, model_cfg: ModelConfig) -> EHRDecoder:
    torch.manual_seed(cfg.schedule.seed)  # identical initial weights on every rank
    model = EHRDecoder(model_cfg)
    if cfg.run.init_from:
        fresh = model.load_base_weights(load_state_dict(cfg.run.init_from))
        if model_cfg.adapter:
            model.freeze_base()
        print(f"initialised from {cfg.run.init_from}; new PRS parameters: {len(fresh)}")
    return model


def optimizer_groups(model: EHRDecoder, cfg: PretrainConfig) -> list[dict]:
    """One part, the whole (trainable) model at optim.lr."""
    return parameter_groups({"model": (model, cfg.optim.lr)}, cfg.optim.weight_decay)


def report(
    engine,
    model_cfg: ModelConfig,
    state: TrainState,
    metrics: dict,
    logger: RunLogger | None,
    rank: int,
    with_checkpoint: bool,
) -> None:
    """Metrics to MLflow (rank 0) and to Ray Train; with a checkpoint every rank adds its shard."""
    if logger:
        logger.log_metrics(metrics, state.step)
    metrics = {**metrics, "step": state.step}
    if not with_checkpoint:
        ray.train.report(metrics)
        return
    report_checkpoint(
        engine,
        state,
        metrics,
        rank,
        lambda directory, weights: save_model_files(directory, weights, model_cfg),
        f"checkpoint_{state.step:07d}",
    )


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = PretrainConfig.model_validate(loop_config["config"])
    model_cfg = ModelConfig.from_dict(loop_config["model"])
    rank, world = worker_setup(cfg.scaling)
    device = ray.train.torch.get_device()

    model = build_model(cfg, model_cfg)
    trainable, total = model.num_parameters(trainable_only=True), model.num_parameters()
    schedule = WarmupCosine(cfg.optim.warmup_steps, cfg.schedule.max_steps, cfg.optim.min_lr_ratio)
    engine, scheduler = initialize_engine(model, optimizer_groups(model, cfg), cfg.engine_spec(), schedule, world)
    perf = cfg.performance
    if perf.compiled(cfg.scaling.use_gpu):
        compile_model(engine)
    loss_chunk = perf.loss_chunk()
    restored = resume(engine)
    state = restored or TrainState()

    logger = open_run_logger(
        loop_config,  # tracking_uri None when mlflow.enabled is false
        rank,
        cfg.mlflow.experiment,
        cfg.run_dir(),
        cfg.run.name,
        {
            "config": cfg.model_dump(mode="json"),
            "model.parameters": total,
            "model.trainable_parameters": trainable,
            "world_size": world,
        },
        dump_config(cfg),
        "pretrain_config.yaml",
    )
    if logger and restored is not None:  # one point per resume: proof that a restart continued, not restarted
        logger.log_metrics({"resumed_from_step": float(state.step)}, state.step)

    stream = BatchStream(ray.train.get_dataset_shard("train"), cfg, model_cfg.num_pgs, state)
    val_batches = validation_batches(ray.train.get_dataset_shard("val"), cfg, model_cfg.num_pgs, rank, world)
    flops_token = flops_per_token(model_cfg, trainable, total)
    peak = peak_flops(device, cfg.scaling.peak_tflops)
    sched = cfg.schedule
    last_step = cfg.last_step

    meter = WindowMeter(device)
    train_loss = math.nan
    try:
        while state.step < last_step:
            _maybe_inject_fault(cfg, rank, state.step + 1)
            for micro in range(sched.grad_accum):
                batch = stream.next()
                torch.manual_seed(sched.seed * 1_000_003 + (state.step * sched.grad_accum + micro) * 131 + rank)
                loss = model_loss(engine, batch, loss_chunk)
                engine.backward(loss)
                engine.step()
                meter.add(loss, (batch["targets"] != PAD_ID).sum(), positions_in(batch, model_cfg))
            state.step += 1
            state.epoch, state.batch_in_epoch = stream.epoch, stream.consumed
            is_last = state.step == last_step
            metrics: dict[str, float] = {}
            if state.step % sched.log_every == 0 or is_last:
                metrics = meter.summary(engine, sched.grad_accum)
                state.tokens_seen += int(metrics.pop("window_tokens"))
                train_loss = metrics["train_loss"]
                metrics.update(
                    lr=scheduler.get_last_lr()[0], epoch=float(stream.epoch), tokens_seen=float(state.tokens_seen)
                )
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                if peak:
                    metrics.update(mfu_figures(flops_token, metrics, peak * world))
            checkpoint_due = state.step % sched.checkpoint_every == 0 or is_last
            if state.step % sched.val_every == 0 or checkpoint_due:
                started = time.perf_counter()
                val_loss = evaluate(engine, val_batches, device, loss_chunk)
                metrics.update(val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 50.0)))
                state.history.append(
                    {
                        "step": state.step,
                        "val_loss": val_loss,
                        "train_loss": train_loss,
                        "lr": scheduler.get_last_lr()[0],
                    }
                )
                report(engine, model_cfg, state, metrics, logger, rank, checkpoint_due)
                meter.exclude(time.perf_counter() - started)
            elif metrics and logger:
                logger.log_metrics(metrics, state.step)
    except BaseException:
        if logger:
            logger.finish("FAILED")
        raise
    if logger:
        logger.finish("FINISHED")
