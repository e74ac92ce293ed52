"""The model files a checkpoint hands to later stages: `model.pt` (a flat dict of tensors, loadable
with torch.load(weights_only=True)) and `model_config.json` (the ModelConfig)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ehrfm.model.config import ModelConfig
from ehrfm.model.transformer import EHRDecoder

WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "model_config.json"


def save_model_files(directory: str | Path, state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    copies: dict[tuple[int, tuple, torch.dtype], torch.Tensor] = {}  # tied weights stay one tensor
    plain = {}
    for name, tensor in state_dict.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key not in copies:
            copies[key] = tensor.detach().to("cpu", copy=True).contiguous()
        plain[name] = copies[key]
    torch.save(plain, directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))


def load_model_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}: not a pretraining checkpoint")
    return ModelConfig.from_dict(json.loads(path.read_text()))


def load_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {directory}: not a pretraining checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32) -> EHRDecoder:
    """The decoder stored in a checkpoint directory, in eval mode."""
    cfg = load_model_config(directory)
    model = EHRDecoder(cfg)
    model.load_state_dict(load_state_dict(directory))
    return model.to(dtype).eval()
