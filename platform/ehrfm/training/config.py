"""Pretraining configuration (jobs/configs/pretrain-*.yaml): run, data, model, performance (packing,
fused loss, compile), optimiser, schedule, DeepSpeed, scaling, fault tolerance and MLflow sections,
all validated with unknown keys rejected."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ehrfm.config import StrictModel
from ehrfm.model.config import ModelConfig


class RunSection(StrictModel):
    name: str = "pretrain"  # the Ray Train run name; starting the same name again resumes it
    storage_path: str = "runs/pretrain"  # local dir or URI (s3://, gs://); checkpoints go to <storage>/<name>/
    init_from: str | None = None  # checkpoint dir of an EHR-only model (adapter mode / warm start)


class DataSection(StrictModel):
    dir: str | None = None  # the directory holding timelines/ (the CLI's --data overrides it)
    # persons (windows) per worker per micro-step; with performance.packing they are packed into
    # R rows of prefix + context positions, R varying per batch (rows x context ~ the token budget)
    batch_size: int = Field(16, ge=1)
    shuffle_buffer: int = Field(256, ge=0)  # rows in each worker's local shuffle buffer (0 = off)
    val_max_windows: int = Field(512, ge=1)  # validation windows kept (all workers together)
    val_batch_size: int = Field(32, ge=1)
    materialize: bool = False  # read the splits into the object store once (small data: skips re-reads per epoch)


class PerformanceSection(StrictModel):
    """How a step uses the device: same data and loss, less padding, no [B, T, V] logits, compiled."""

    packing: bool = True  # pack several persons' windows per row (document-masked attention)
    fused_loss: bool = True  # linear + cross-entropy over chunks of loss_chunk_tokens, no full logits
    loss_chunk_tokens: int = Field(4096, ge=1)
    compile: bool | None = None  # torch.compile the model inside the DeepSpeed engine; None: on with GPUs

    def loss_chunk(self) -> int:
        """The model's `loss_chunk` argument: 0 = the plain loss from full logits."""
        return self.loss_chunk_tokens if self.fused_loss else 0

    def compiled(self, use_gpu: bool) -> bool:
        return use_gpu if self.compile is None else self.compile


class OptimSection(StrictModel):
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine floor as a share of lr
    warmup_steps: int = Field(200, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = Field(1.0, ge=0)  # 0 = no clipping


class ScheduleSection(StrictModel):
    max_steps: int = Field(1000, ge=1)  # optimiser steps of the whole run (the LR schedule spans them)
    stop_at_step: int | None = None  # end this invocation early (the schedule still spans max_steps)
    grad_accum: int = Field(1, ge=1)
    log_every: int = Field(10, ge=1)  # host syncs happen only here
    val_every: int = Field(100, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0


class DeepSpeedSection(StrictModel):
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    overlap_comm: bool | None = None  # None: on with GPUs
    reduce_bucket_size: int = Field(50_000_000, ge=1)
    stage3_prefetch_bucket_size: int = Field(50_000_000, ge=1)
    stage3_param_persistence_threshold: int = Field(100_000, ge=0)

    def bf16(self, use_gpu: bool) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and use_gpu)


@dataclass(frozen=True)
class EngineSpec:
    """What the one training engine (`ehrfm.training.engine`) needs from a job's config, so pretraining
    and fine-tuning hand it the same thing instead of the engine knowing either config."""

    deepspeed: DeepSpeedSection
    micro_batch: int  # examples (windows) per worker per micro-step
    grad_accum: int
    grad_clip: float  # 0 = no clipping
    use_gpu: bool
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    @property
    def bf16(self) -> bool:
        return self.deepspeed.bf16(self.use_gpu)


class ScalingSection(StrictModel):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    torch_threads: int | None = None  # None: Ray's OMP_NUM_THREADS for the worker
    peak_tflops: float | None = None  # per GPU for MFU; None: looked up from the device name


class FaultSection(StrictModel):
    max_failures: int = Field(2, ge=-1)  # worker-group restarts from the last checkpoint; -1 = unlimited
    kill_rank_at_step: int | None = None  # test hook: that rank SIGKILLs itself once before this step
    kill_rank: int = 1
    marker_path: str | None = None  # default <storage>/<name>/.fault_injected (so the kill fires once)


class MlflowSection(StrictModel):
    enabled: bool = True
    tracking_uri: str | None = None  # else $MLFLOW_TRACKING_URI, else the local server; sqlite:///... for none
    experiment: str = "ehrfm-pretrain"


class PretrainConfig(StrictModel):
    run: RunSection = RunSection()
    data: DataSection = DataSection()
    model: ModelConfig = ModelConfig()
    performance: PerformanceSection = PerformanceSection()
    optim: OptimSection = OptimSection()
    schedule: ScheduleSection = ScheduleSection()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    scaling: ScalingSection = ScalingSection()
    fault: FaultSection = FaultSection()
    mlflow: MlflowSection = MlflowSection()

    @model_validator(mode="after")
    def _consistent(self) -> PretrainConfig:
        if self.schedule.stop_at_step is not None and self.schedule.stop_at_step > self.schedule.max_steps:
            raise ValueError("schedule.stop_at_step cannot exceed schedule.max_steps")
        if self.optim.warmup_steps >= self.schedule.max_steps:
            raise ValueError("optim.warmup_steps must be smaller than schedule.max_steps")
        if self.deepspeed.precision == "bf16" and not self.scaling.use_gpu:
            raise ValueError("deepspeed.precision bf16 needs scaling.use_gpu (CPU runs train in fp32)")
        if self.model.adapter and not self.run.init_from:
            raise ValueError("model.adapter needs run.init_from: the EHR-only checkpoint to add PRS to")
        return self

    @property
    def bf16(self) -> bool:
        return self.deepspeed.bf16(self.scaling.use_gpu)

    def engine_spec(self) -> EngineSpec:
        return EngineSpec(
            deepspeed=self.deepspeed,
            micro_batch=self.data.batch_size,
            grad_accum=self.schedule.grad_accum,
            grad_clip=self.optim.grad_clip,
            use_gpu=self.scaling.use_gpu,
            betas=self.optim.betas,
            eps=self.optim.eps,
        )

    @property
    def last_step(self) -> int:
        """The step this invocation stops at."""
        return self.schedule.stop_at_step or self.schedule.max_steps

    def run_dir(self) -> str:
        return f"{self.run.storage_path.rstrip('/')}/{self.run.name}"

    def fault_marker(self) -> Path:
        return Path(self.fault.marker_path or Path(self.run_dir()) / ".fault_injected")
