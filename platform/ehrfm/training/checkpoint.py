"""Save and restore training state inside a Ray Train checkpoint directory, for pretraining and
fine-tuning alike: every rank writes its DeepSpeed shard, rank 0 adds the model files (the job's
own: a decoder checkpoint or a risk-model directory) and train_state.json.

Every file of a checkpoint loads with torch.load(weights_only=True): model.pt is plain tensors, and
DeepSpeed's own files are read through `SafeTorchCheckpointEngine`, which allows only the few
DeepSpeed classes they contain (no arbitrary unpickling when resuming from shared storage).

Layout of one checkpoint (Ray merges what every worker writes into one directory):
    deepspeed/state/...      DeepSpeed's engine checkpoint: module, ZeRO-partitioned optimiser
                             and LR scheduler per rank (exact resume, any ZeRO stage)
    model.pt                 consolidated weights, a flat {name: tensor} dict (fp32) that loads
                             with torch.load(weights_only=True); what fine-tuning and serving read
    model_config.json        the ModelConfig (fine-tuning adds head.json and tokenizer.json)
    train_state.json         step, data position (epoch, batch in epoch), tokens seen, history
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import deepspeed
import ray.train
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
STATE_FILE = "train_state.json"


# The non-tensor objects DeepSpeed pickles into its module/optimiser state files (ZeRO 0-3).
DEEPSPEED_SAFE_GLOBALS = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


class SafeTorchCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with weights_only=True and a short allowlist."""

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)


def use_safe_loading(engine) -> None:
    """Swap the engine's checkpoint engine for the weights_only one (saving is unchanged)."""
    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise TypeError(f"expected DeepSpeed's TorchCheckpointEngine, found {type(current).__name__}")
    safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    safe.__dict__.update(current.__dict__)
    engine.checkpoint_engine = safe


@dataclass
class TrainState:
    """Where training is: restored from the checkpoint, advanced by the loop."""

    step: int = 0  # optimiser steps done
    epoch: int = 0  # pretraining: current pass over the train split; fine-tuning: epochs done
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed (pretraining)
    tokens_seen: int = 0  # non-pad target tokens, all workers (pretraining)
    history: list[dict] = field(default_factory=list)  # validation points (step or epoch, losses, metrics)
    restarts: int = 0  # times this run was resumed from a checkpoint

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_file(cls, path: Path) -> TrainState:
        return cls(**json.loads(path.read_text()))


def consolidated_state_dict(engine) -> dict[str, torch.Tensor]:
    """Full fp32 weights on every rank (ZeRO-3 shards are gathered; a collective: call on all ranks).

    Tied parameters keep one shared tensor, so torch.save stores the embedding once.
    """
    module = engine.module
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        copies: dict[int, torch.Tensor] = {}
        for param in params:
            copies.setdefault(id(param), param.detach().to("cpu", torch.float32, copy=True))
        named = dict(module.named_parameters(remove_duplicate=False))
        state = {}
        for name, value in module.state_dict(keep_vars=True).items():
            source = named.get(name)
            state[name] = copies[id(source)] if source is not None else value.detach().to("cpu", copy=True)
    return state


WriteModel = Callable[[Path, dict[str, torch.Tensor]], None]  # (directory, consolidated weights) -> model files


def save_checkpoint(engine, state: TrainState, directory: Path, rank: int, write_model: WriteModel) -> None:
    """Every rank writes its DeepSpeed shard into `directory`; rank 0 adds the model files
    (`write_model` with the consolidated weights) and train_state.json."""
    engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
    weights = consolidated_state_dict(engine)
    if rank == 0:
        write_model(directory, weights)
        (directory / STATE_FILE).write_text(state.to_json())


def report_checkpoint(
    engine, state: TrainState, metrics: dict, rank: int, write_model: WriteModel, dir_name: str
) -> None:
    """`ray.train.report` from every rank with its part of the checkpoint (Ray merges them into
    <run>/<dir_name>); a collective, so every rank calls it at the same point."""
    with tempfile.TemporaryDirectory(prefix="ehrfm-ckpt-") as tmp:
        save_checkpoint(engine, state, Path(tmp), rank, write_model)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=dir_name)


def restore_checkpoint(engine, directory: Path) -> TrainState:
    """Load the engine state (weights, optimiser, LR schedule) and the loop state from `directory`."""
    use_safe_loading(engine)
    state_file = directory / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"checkpoint {directory} has no {STATE_FILE}")
    load_path, _ = engine.load_checkpoint(
        str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise FileNotFoundError(f"checkpoint {directory} has no DeepSpeed state under {DEEPSPEED_DIR}/{DEEPSPEED_TAG}")
    return TrainState.from_file(state_file)


def resume(engine) -> TrainState | None:
    """The loop state of Ray Train's latest checkpoint with the engine restored from it (a restarted
    worker group, or the same run started again); None for a fresh run."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state = restore_checkpoint(engine, Path(directory))
    state.restarts += 1
    return state
