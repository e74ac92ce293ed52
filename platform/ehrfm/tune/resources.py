"""How many trials run at once: as many as the cluster fits whole (driver + all Train workers),
after leaving headroom for Ray Data. A Train run starts only when all its workers are placed, so
trials beyond that number would sit as idle drivers waiting for workers (the Ray Train + Tune
guide's advice: cap them with max_concurrent_trials)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from ehrfm.training.config import ScalingSection

EPSILON = 1e-9  # float sums like 3 x 0.1 must not lose a whole trial to rounding


def trial_cpus(scaling: ScalingSection, driver_cpus: float) -> float:
    return driver_cpus + scaling.num_workers * scaling.cpus_per_worker


def max_concurrent_trials(
    cluster: Mapping[str, float], scaling: ScalingSection, driver_cpus: float, headroom_cpus: float
) -> int:
    """max(1, floor((cluster CPUs - headroom) / CPUs per trial)), and no more than the GPUs hold
    when the workers use GPUs. A cluster that cannot hold even one trial is an error."""
    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    per_trial = trial_cpus(scaling, driver_cpus)
    if per_trial > cpus + EPSILON:
        raise ValueError(
            f"one trial needs {per_trial:g} CPUs (driver {driver_cpus:g} + {scaling.num_workers} "
            f"workers x {scaling.cpus_per_worker:g}) but the cluster has {cpus:g}"
        )
    if scaling.use_gpu and gpus < scaling.num_workers:
        raise ValueError(f"one trial needs {scaling.num_workers} GPUs but the cluster has {gpus:g}")
    limit = math.floor((cpus - headroom_cpus) / per_trial + EPSILON)
    if scaling.use_gpu:
        limit = min(limit, math.floor(gpus / scaling.num_workers + EPSILON))
    return max(1, limit)
