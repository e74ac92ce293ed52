"""Person-level split and shard assignment from a hash of subject_id.

Both are pure functions of the id (and a salt), so every worker, every run and every engine (the
Ray pipeline, the polars reference, a later stage) agrees on them without passing a table around,
and a person never straddles splits or shards.
"""

from __future__ import annotations

import numpy as np

from ehrfm.constants import SPLITS

SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}  # train=0, val=1, test=2
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
SHARD_SALT = 0x5EED5A17  # shards must not correlate with splits, so they use their own salt


def splitmix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, vectorised over uint64 (wrapping arithmetic)."""
    z = np.asarray(values).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def subject_hash(subject_ids: np.ndarray, salt: int) -> np.ndarray:
    """A 64-bit hash per subject id, different for every salt."""
    ids = np.asarray(subject_ids, dtype=np.int64).view(np.uint64)
    salt_mix = splitmix64(np.array([salt & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    return splitmix64(ids ^ salt_mix)


def subject_uniform(subject_ids: np.ndarray, salt: int) -> np.ndarray:
    """A number in [0, 1) per subject id (53 bits of its hash)."""
    return (subject_hash(subject_ids, salt) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def split_codes(subject_ids: np.ndarray, ratios: tuple[float, float, float], salt: int) -> np.ndarray:
    """int8 split code per subject (index into schemas.SPLITS) for train/val/test `ratios`."""
    train, val, _ = normalise_ratios(ratios)
    u = subject_uniform(subject_ids, salt)
    return np.where(u < train, 0, np.where(u < train + val, 1, 2)).astype(np.int8)


def normalise_ratios(ratios: tuple[float, float, float]) -> tuple[float, float, float]:
    """Ratios scaled to sum to 1; negative or all-zero ratios are a configuration error."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"split ratios must be three non-negative numbers with a positive sum, got {ratios}")
    total = float(sum(ratios))
    return ratios[0] / total, ratios[1] / total, ratios[2] / total


def shard_of(subject_ids: np.ndarray, num_shards: int) -> np.ndarray:
    """int32 shard index per subject id in [0, num_shards)."""
    if num_shards < 1:
        raise ValueError("num_shards must be at least 1")
    return (subject_hash(subject_ids, SHARD_SALT) % np.uint64(num_shards)).astype(np.int32)


def num_shards_for(num_subjects: int, subjects_per_shard: int, min_shards: int = 1) -> int:
    """How many shards hold `num_subjects` at about `subjects_per_shard` each (a function of the count only)."""
    return max(min_shards, -(-max(num_subjects, 1) // max(subjects_per_shard, 1)))
