"""Save and restore training state inside a Ray Train checkpoint directory.

Every file of a checkpoint loads with torch.load(weights_only=True): model.pt is plain tensors, and
DeepSpeed's own files are read through `SafeTorchCheckpointEngine`, which allows only the few
DeepSpeed classes they contain (no arbitrary unpickling when resuming from shared storage).

Layout of one checkpoint (Ray merges what every worker writes into one directory):
    deepspeed/state/...      DeepSpeed's engine checkpoint: module, ZeRO-partitioned optimiser
                             and LR scheduler per rank (exact resume, any ZeRO stage)
    model.pt                 consolidated weights, a flat {name: tensor} dict (fp32) that loads
                             with torch.load(weights_only=True); what fine-tuning and serving read
    model_config.json        the ModelConfig
    train_state.json         step, data position (epoch, batch in epoch), tokens seen, history
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import deepspeed
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from ehrfm.model.config import ModelConfig
from ehrfm.model.io import save_model_files

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
    epoch: int = 0  # current pass over the train split
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    tokens_seen: int = 0  # non-pad target tokens, all workers
    history: list[dict] = field(default_factory=list)  # validation points: step, val_loss, train_loss, lr
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


def save_checkpoint(engine, model_cfg: ModelConfig, state: TrainState, directory: Path, rank: int) -> None:
    """Every rank writes its DeepSpeed shard into `directory`; rank 0 adds model files and state."""
    engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
    weights = consolidated_state_dict(engine)
    if rank == 0:
        save_model_files(directory, weights, model_cfg)
        (directory / STATE_FILE).write_text(state.to_json())


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
