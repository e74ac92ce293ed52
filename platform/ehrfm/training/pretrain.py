"""`ehrfm pretrain` / jobs/pretrain.py: pretrain the decoder on Ray Train + DeepSpeed ZeRO.

    python jobs/pretrain.py --config jobs/configs/pretrain-cpu-small.yaml --data runs/demo [key=value ...]

The driver reads the timelines manifest (vocabulary size, PRS width), builds the train/val Ray
Datasets and starts a TorchTrainer; each worker runs `ehrfm.training.pretrain_loop.train_loop_per_worker`.
Starting the same run (storage_path + name) again resumes it from its latest checkpoint.
Metrics go to MLflow: mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else the local tracking
server (started or reused by the driver, which passes the URI to the workers).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ehrfm.config import add_config_arguments, parse_config
from ehrfm.paths import absolute_path
from ehrfm.training.config import PretrainConfig
from ehrfm.training.launch import artifact_root, torch_trainer
from ehrfm.training.run_logger import resolve_tracking_uri
from ehrfm.training.windows import TimelineManifest, timeline_dataset

RESULT_FILE = "pretrain_result.json"


@dataclass(frozen=True)
class PretrainResult:
    run_dir: str
    checkpoint: str | None  # the latest checkpoint directory (holds model.pt + model_config.json)
    metrics: dict
    tracking_uri: str | None

    def to_dict(self) -> dict:
        return {
            "run_dir": self.run_dir,
            "checkpoint": self.checkpoint,
            "metrics": self.metrics,
            "tracking_uri": self.tracking_uri,
        }


def load_datasets(cfg: PretrainConfig) -> dict:
    """The train and val Ray Datasets of `cfg.data.dir` (materialised when the config asks for it)."""
    datasets = {split: timeline_dataset(cfg.data.dir, split) for split in ("train", "val")}
    if cfg.data.materialize:
        datasets = {split: ds.materialize() for split, ds in datasets.items()}
    return datasets


def build_trainer(cfg: PretrainConfig, datasets: dict | None = None):
    """(TorchTrainer, MLflow tracking URI) for `cfg`, whose paths are already absolute.

    `datasets` lets callers that start several runs on the same data (sweeps, tests) read it once.
    """
    import ray.train

    manifest = TimelineManifest.read(cfg.data.dir)
    model_cfg = cfg.model.with_data(manifest.vocab_size, manifest.num_pgs)
    if model_cfg.fusion != "none" and manifest.num_pgs == 0:
        raise ValueError(
            f"model.fusion={model_cfg.fusion} but {cfg.data.dir}/timelines has no PRS columns: pass "
            "model.fusion=none for an EHR-only decoder (the adapter adds PRS later), or preprocess with --prs"
        )
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.run.storage_path) if cfg.mlflow.enabled else None
    loop_config = {
        # the filled model section, so the run's params and logged config show the data's vocab_size/num_pgs
        "config": cfg.model_copy(update={"model": model_cfg}).model_dump(mode="json"),
        "model": model_cfg.to_dict(),
        "tracking_uri": tracking_uri,
        "artifact_root": artifact_root(cfg.run.storage_path),
    }
    datasets = datasets if datasets is not None else load_datasets(cfg)
    from ehrfm.training.pretrain_loop import train_loop_per_worker

    run_config = ray.train.RunConfig(
        name=cfg.run.name,
        storage_path=cfg.run.storage_path,
        failure_config=ray.train.FailureConfig(max_failures=cfg.fault.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.schedule.keep_checkpoints),
    )
    return torch_trainer(train_loop_per_worker, loop_config, cfg.scaling, run_config, datasets), tracking_uri


def run_pretraining(cfg: PretrainConfig, datasets: dict | None = None) -> PretrainResult:
    """Train (or resume) the run described by `cfg`; returns where its latest checkpoint is."""
    if not cfg.data.dir:
        raise ValueError("no data directory: pass --data DIR (the directory holding timelines/) or set data.dir")
    cfg = cfg.model_copy(deep=True)
    cfg.data.dir = absolute_path(cfg.data.dir)
    cfg.run.storage_path = absolute_path(cfg.run.storage_path)
    if cfg.run.init_from:
        cfg.run.init_from = absolute_path(cfg.run.init_from)
    if "://" not in cfg.run.storage_path:
        Path(cfg.run.storage_path).mkdir(parents=True, exist_ok=True)
    trainer, tracking_uri = build_trainer(cfg, datasets)
    result = trainer.fit()
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    outcome = PretrainResult(cfg.run_dir(), checkpoint, dict(result.metrics or {}), tracking_uri)
    if "://" not in cfg.run.storage_path:
        (Path(cfg.run_dir()) / RESULT_FILE).write_text(json.dumps(outcome.to_dict(), indent=2))
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ehrfm pretrain", description=__doc__.splitlines()[0])
    add_config_arguments(parser, "pretraining (PretrainConfig)")
    parser.add_argument("--data", help="directory holding timelines/ (overrides data.dir)")
    parser.add_argument("--storage", help="checkpoint storage path (overrides run.storage_path)")
    parser.add_argument("--name", help="run name (overrides run.name); same name = resume")
    args = parser.parse_args(argv)
    flags = {"data": "data.dir", "storage": "run.storage_path", "name": "run.name"}
    cfg = parse_config(parser, PretrainConfig, args, flags)
    import ray

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS / a running cluster if there is one, else a local instance
    outcome = run_pretraining(cfg)
    print(json.dumps(outcome.to_dict(), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
