"""The one way a training job reaches its workers: a Ray Train `TorchTrainer` around the job's
worker loop, the same for pretraining and fine-tuning (gloo on CPU, NCCL on GPU; only the train
split is divided among the workers, the val split is read whole by each), and the worker-side
preamble both loops start with."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ehrfm.paths import is_uri
from ehrfm.training.config import ScalingSection


def torch_trainer(loop: Callable[[dict], None], loop_config: dict, scaling: ScalingSection, run_config, datasets: dict):
    """TorchTrainer running `loop(loop_config)` on `scaling.num_workers` workers over `datasets`."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker},  # plus 1 GPU each when use_gpu
        ),
        run_config=run_config,
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def artifact_root(storage_path: str) -> str | None:
    """MLflow artifacts beside a local run's checkpoints; None (the server's default) for a URI."""
    return None if is_uri(storage_path) else str(Path(storage_path) / "mlflow-artifacts")


def worker_setup(scaling: ScalingSection) -> tuple[int, int]:
    """On a Ray Train worker: (rank, world size), with torch's threads set from the config."""
    import ray.train
    import torch

    if scaling.torch_threads:
        torch.set_num_threads(scaling.torch_threads)
    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size()
