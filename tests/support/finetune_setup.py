"""What tests/{unit,integration,e2e}/test_finetune.py share: the shipped fine-tuning config made fast, the run
config for the factory's data and pretrained decoder, and the predictions a run writes."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ehrfm.config import load_config
from ehrfm.transfer.finetune_config import FinetuneConfig

CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "finetune-t2d.yaml"
FAST = [
    "train.epochs=3",
    "train.batch_size=16",
    "train.shuffle_buffer=64",
    "train.eval_batch_size=64",
    "scaling.num_workers=2",
    "scaling.cpus_per_worker=0.5",
    "scaling.torch_threads=1",
]


def config(data, pretrained, labels: Path, storage: Path, name: str, *overrides: str) -> FinetuneConfig:
    cfg = load_config(FinetuneConfig, CONFIG, FAST + list(overrides))
    cfg.data.dir, cfg.data.labels, cfg.model.pretrained = str(data.root), str(labels), str(pretrained)
    cfg.run.storage_path, cfg.run.name = str(storage), name
    return cfg


def predictions(run_dir: Path) -> pa.Table:
    return pq.read_table(run_dir / "predictions.parquet")
