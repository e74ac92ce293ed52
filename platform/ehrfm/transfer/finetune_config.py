"""Fine-tuning configuration (jobs/configs/finetune-*.yaml): what to fine-tune from, on which labels,
how much of the decoder trains, and the per-epoch schedule that Ray Tune trials vary.

DeepSpeed, scaling and MLflow sections are the pretraining ones (both run on the one training
engine, `ehrfm.training.engine`), so a cluster set-up carries over unchanged.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ehrfm.config import StrictModel
from ehrfm.model.risk import HeadInputs
from ehrfm.model.value_bins import ValueEncoding
from ehrfm.training.config import DeepSpeedSection, EngineSpec, MlflowSection, ScalingSection

Mode = Literal["linear_probe", "full", "partial"]
Imbalance = Literal["none", "pos_weight", "oversample"]


class FinetuneRun(StrictModel):
    name: str = "finetune"  # Ray Train run name; the run directory is <storage_path>/<name>
    storage_path: str = "runs/finetune"  # local dir or URI; checkpoints, model/ and predictions go there
    max_failures: int = Field(1, ge=-1)  # worker-group restarts from the last epoch checkpoint


class FinetuneData(StrictModel):
    dir: str | None = None  # preprocessed directory: timelines/ (+ tokenizer.json, events/ for labeling)
    labels: str | None = None  # MEDS label parquet (file or dir); None: label <dir>/events with the task
    omop: str | None = None  # OMOP dir with concept_ancestor, for on-the-fly labeling (optional)
    context: int | None = Field(None, ge=1)  # window length; None: the pretrained model's context
    # Windows of `context` tokens read per person, newest last: 1 reads only the window ending at the
    # prediction time; more let the head's `+mean` pool over the history before it (one decoder pass
    # per non-empty window, so the cost per person grows with their record, at most this many times).
    history_windows: int = Field(1, ge=1, le=64)


class FinetuneModel(StrictModel):
    pretrained: str | None = None  # checkpoint dir (model.pt + model_config.json) or pretraining run dir
    mode: Mode = "linear_probe"  # linear_probe: head only; partial: + top blocks; full: everything
    unfrozen_layers: int = Field(0, ge=0)  # partial mode: how many top decoder blocks train
    head_inputs: HeadInputs = "last+mean+prs"
    head_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # > 0: the head also reads the newest window's recent lab-value bins, one-hot, for this many of
    # the tokenizer's most measured codes with bins (model/value_bins.py; none when it binned no
    # values). 0: states only. Default 40 (README, #21): cross-fitted +0.022..+0.028 on both
    # cohorts; this fine-tune on the default cohort +0.017 val / +0.018 test AUROC
    value_codes: int = Field(40, ge=0)
    value_recency_days: list[int] = Field(default_factory=lambda: [30, 365])  # + "anywhere in the window"
    value_encoding: ValueEncoding = "one_hot"  # model/value_bins.py


class FinetuneOptim(StrictModel):
    head_lr: float = Field(1e-3, gt=0)
    backbone_lr: float = Field(1e-4, gt=0)  # the decoder's trainable parameters (partial / full)
    weight_decay: float = Field(0.01, ge=0)  # on weight matrices only, not biases or norms
    grad_clip: float = Field(1.0, ge=0)  # 0 = no clipping


class FinetuneSchedule(StrictModel):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1)  # examples per worker per step
    eval_batch_size: int = Field(128, ge=1)
    shuffle_buffer: int = Field(512, ge=0)  # rows in each worker's local shuffle buffer (0 = off)
    # Share of genotyped people shown as non-genotyped in training (has_prs false for trunk and head
    # alike), so the masked path the PRS contribution is measured with is trained too.
    modality_dropout: float = Field(0.2, ge=0.0, lt=1.0)
    imbalance: Imbalance = "pos_weight"  # pos_weight: weight positives in the loss; oversample: repeat them
    pos_weight: float | None = Field(None, gt=0)  # None: negatives / positives of the train split
    keep_checkpoints: int = Field(1, ge=1)  # best by validation AUROC (the latest is kept as well)
    seed: int = 0


class FinetuneMlflow(MlflowSection):
    experiment: str = "ehrfm-finetune"


class FinetuneConfig(StrictModel):
    run: FinetuneRun = FinetuneRun()
    task: str = "t2d"  # shipped task name or task YAML (labels, horizon)
    horizon_days: int | None = Field(None, gt=0)  # None: the task definition's horizon
    data: FinetuneData = FinetuneData()
    model: FinetuneModel = FinetuneModel()
    optim: FinetuneOptim = FinetuneOptim()
    train: FinetuneSchedule = FinetuneSchedule()
    # ZeRO-2 by default, as in pretraining: AdamW's state (two fp32 copies per weight) and the
    # gradients are sharded over the workers, which is what a full fine-tune of a large decoder
    # needs, while every rank keeps whole weights, so validation scoring needs no gather (and a
    # linear probe, with only the head in the optimiser, pays next to nothing for it).
    # fp32 by default, also on GPU (as before the shared engine): in bf16 the saved risk model
    # would carry bf16-rounded copies of even the frozen pretrained weights; set bf16 for a large
    # full fine-tune.
    deepspeed: DeepSpeedSection = DeepSpeedSection(zero_stage=2, precision="fp32")
    scaling: ScalingSection = ScalingSection()
    mlflow: FinetuneMlflow = FinetuneMlflow()

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneConfig:
        if self.model.mode == "partial" and self.model.unfrozen_layers < 1:
            raise ValueError("model.mode partial needs model.unfrozen_layers >= 1")
        if self.model.mode != "partial" and self.model.unfrozen_layers:
            raise ValueError(f"model.unfrozen_layers is only used with mode partial (mode is {self.model.mode})")
        if self.train.pos_weight is not None and self.train.imbalance != "pos_weight":
            raise ValueError("train.pos_weight is set but train.imbalance is not pos_weight")
        if self.data.history_windows > 1 and "+mean" not in self.model.head_inputs:
            raise ValueError(
                f"data.history_windows={self.data.history_windows} is read through the head's mean pooling: "
                f"model.head_inputs {self.model.head_inputs!r} needs '+mean'"
            )
        if self.deepspeed.precision == "bf16" and not self.scaling.use_gpu:
            raise ValueError("deepspeed.precision bf16 needs scaling.use_gpu (CPU runs train in fp32)")
        return self

    def engine_spec(self) -> EngineSpec:
        """One step per batch, no accumulation; AdamW at torch's default betas and eps."""
        return EngineSpec(
            deepspeed=self.deepspeed,
            micro_batch=self.train.batch_size,
            grad_accum=1,
            grad_clip=self.optim.grad_clip,
            use_gpu=self.scaling.use_gpu,
        )

    def run_dir(self) -> str:
        return f"{self.run.storage_path.rstrip('/')}/{self.run.name}"
