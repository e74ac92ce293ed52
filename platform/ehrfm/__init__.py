"""ehrfm: multimodal EHR foundation models with polygenic risk scores as a native modality."""

__version__ = "0.1.0"
