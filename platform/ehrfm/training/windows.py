"""timelines/ -> Ray Datasets -> fixed-length training windows (tensors) on each worker.

Reading and splitting stay in Ray Data; the window cut happens in the `iter_torch_batches`
collate function on the worker, where the epoch is known: each person contributes one window of
`context + 1` tokens per epoch, at a start drawn from a hash of (seed, epoch, subject_id). The
same epoch therefore gives the same windows however the rows were split or ordered, and a
resumed run sees the windows an uninterrupted run would have seen. Short timelines are padded
on the right with PAD (excluded from the loss), or, with packing on (`performance.packing`), the
same windows are packed several to a row (`ehrfm.training.packing`): a pure function of the batch,
so resume stays exact. Validation batches are never packed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from ehrfm.constants import PAD_ID, SPLITS
from ehrfm.preprocess.arrow_lists import list_values_offsets, timeline_files
from ehrfm.prs.person import stored_width, vectors_to_numpy
from ehrfm.training.packing import pack_windows

COLUMNS = ["subject_id", "tokens", "ages", "prs", "has_prs"]
VALIDATION_EPOCH = -1  # the fixed window stream used for every validation pass


@dataclass(frozen=True)
class TimelineManifest:
    """The parts of timelines/manifest.json that size the model."""

    vocab_size: int
    num_pgs: int
    pgs_ids: list[str]

    @classmethod
    def read(cls, data_dir: str | Path) -> TimelineManifest:
        path = Path(data_dir) / "timelines" / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: run `ehrfm preprocess` first (or pass --data DIR "
                "pointing at the directory that holds timelines/)"
            )
        data = json.loads(path.read_text(encoding="utf-8"))
        missing = [key for key in ("vocab_size", "num_pgs", "pgs_ids") if key not in data]
        if missing:
            raise ValueError(f"{path}: missing keys {missing}")
        if len(data["pgs_ids"]) != data["num_pgs"]:
            raise ValueError(f"{path}: num_pgs={data['num_pgs']} but {len(data['pgs_ids'])} pgs_ids")
        return cls(int(data["vocab_size"]), int(data["num_pgs"]), list(data["pgs_ids"]))


def timeline_dataset(data_dir: str | Path, split: str):
    """Ray Dataset of one split's timelines (only the columns training reads)."""
    import ray.data

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return (
        ray.data.read_parquet(timeline_files(data_dir), columns=COLUMNS + ["split"])
        .filter(expr=f"split == '{split}'")
        .select_columns(COLUMNS)
    )


def hash_uniform(subject_ids: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """A uniform [0, 1) number per id from a splitmix64 hash of (seed, epoch, id): order-free randomness."""
    with np.errstate(over="ignore"):
        x = subject_ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x ^= np.uint64((seed * 1_000_003 + epoch * 7919) & 0xFFFFFFFFFFFFFFFF)
        for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):  # splitmix64 finaliser
            x ^= x >> np.uint64(shift)
            x *= np.uint64(mult)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def window_starts(subject_ids: np.ndarray, lengths: np.ndarray, window: int, seed: int, epoch: int) -> np.ndarray:
    """Start of each person's window: uniform over the valid starts, drawn by `hash_uniform`."""
    uniform = hash_uniform(subject_ids, seed, epoch)
    choices = np.maximum(lengths - window, 0) + 1
    return np.minimum((uniform * choices).astype(np.int64), choices - 1)


def cut_windows(values: np.ndarray, offsets: np.ndarray, starts: np.ndarray, window: int, fill: int) -> np.ndarray:
    """Rows [n, window] of a flattened list column (values, offsets), from `starts`, right-padded."""
    lengths = np.diff(offsets)
    take = np.minimum(lengths - starts, window)
    cols = np.arange(window)[None, :]
    valid = cols < take[:, None]
    index = np.where(valid, offsets[:-1, None] + starts[:, None] + cols, 0)
    out = np.where(valid, values[index] if len(values) else fill, fill)
    return out


class WindowCollate(ArrowBatchCollateFn):
    """Arrow batch of timelines -> dict of tensors: tokens/targets/ages [B, context], prs [B, K], has_prs [B].

    With `pack_prefix` set (the model's prefix length; packing on), tokens/targets/ages/segment/
    positions/prefix_slot are [R, pack_prefix + context] packed rows instead (R varies per batch),
    per person prs/has_prs/subject_id unchanged. As an ArrowBatchCollateFn, `iter_torch_batches`
    hands it Arrow tables and moves its output (a dict of tensors) to the worker's device.
    """

    def __init__(self, context: int, num_pgs: int, seed: int, epoch: int, pack_prefix: int | None = None):
        self.context, self.num_pgs, self.seed, self.epoch = context, num_pgs, seed, epoch
        self.pack_prefix = pack_prefix

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        window = self.context + 1
        tokens, offsets = list_values_offsets(batch.column("tokens"))
        ages, age_offsets = list_values_offsets(batch.column("ages"))
        if not np.array_equal(offsets, age_offsets):
            raise ValueError("timelines: tokens and ages differ in length for some rows")
        subject_ids = batch.column("subject_id").to_numpy()
        starts = window_starts(subject_ids, np.diff(offsets), window, self.seed, self.epoch)
        token_rows = cut_windows(tokens, offsets, starts, window, PAD_ID).astype(np.int64)
        age_rows = cut_windows(ages, offsets, starts, window, 0).astype(np.int32)
        prs = batch.column("prs").combine_chunks()
        width = stored_width(prs.type)
        if width != self.num_pgs or (width == 0 and len(prs.flatten())):
            raise ValueError(f"timelines: prs has {width} scores per person, the manifest says {self.num_pgs}")
        prs_rows = vectors_to_numpy(prs, self.num_pgs)
        has_prs = pc.fill_null(batch.column("has_prs"), False).to_numpy(zero_copy_only=False)
        per_person = {
            "prs": torch.from_numpy(prs_rows.copy()),
            "has_prs": torch.from_numpy(has_prs.astype(np.bool_)),
            "subject_id": torch.from_numpy(subject_ids.astype(np.int64)),
        }
        if self.pack_prefix is not None:
            lengths = np.minimum(np.diff(offsets) - starts, window)
            packed = pack_windows(token_rows, age_rows, lengths, self.pack_prefix, self.context)
            return {**{k: torch.from_numpy(v) for k, v in packed.items()}, **per_person}
        return {
            "tokens": torch.from_numpy(token_rows[:, :-1].copy()),
            "targets": torch.from_numpy(token_rows[:, 1:].copy()),
            "ages": torch.from_numpy(age_rows[:, :-1].copy()),
            **per_person,
        }


def iter_epoch(
    shard,
    batch_size: int,
    context: int,
    num_pgs: int,
    seed: int,
    epoch: int,
    shuffle_buffer: int = 0,
    drop_last: bool = True,
    pack_prefix: int | None = None,
):
    """Torch batches of one pass over a worker's shard; the local shuffle is seeded by the epoch.
    `batch_size` is persons (windows) per batch; with `pack_prefix` set they come packed into rows."""
    shuffle = shuffle_buffer if shuffle_buffer and shuffle_buffer >= batch_size else None
    return shard.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=WindowCollate(context, num_pgs, seed, epoch, pack_prefix),
        drop_last=drop_last,
        local_shuffle_buffer_size=shuffle,
        local_shuffle_seed=(seed * 1000 + epoch) if shuffle else None,
        prefetch_batches=1,
    )
