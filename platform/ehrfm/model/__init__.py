"""The multimodal decoder (EHR events + PRS); plain PyTorch, no Ray or DeepSpeed."""

from ehrfm.model.config import ModelConfig
from ehrfm.model.heads import ClassificationHead
from ehrfm.model.io import load_model, load_model_config, save_model_files
from ehrfm.model.transformer import EHRDecoder, KVCache

__all__ = [
    "ClassificationHead",
    "EHRDecoder",
    "KVCache",
    "ModelConfig",
    "load_model",
    "load_model_config",
    "save_model_files",
]
