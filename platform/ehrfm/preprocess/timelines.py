"""One shard of timelines: the MEDS data files of shard S + prs/part-S + the tokenizer -> timelines/part-S.

Shards are subject-complete (all events of a person live in the `data/<split>/part-S` files of one
shard, and the PRS rows use the same subject hash), so a shard is converted on its own, in one
task, with no shuffle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ehrfm.constants import SPLITS, UNK_ID
from ehrfm.meds.reader import subject_split_codes
from ehrfm.preprocess.tokenizer import ShardTimelines, Tokenizer
from ehrfm.prs.person import float32_vectors, storable, vectors_to_numpy
from ehrfm.schemas import timeline_schema

EVENT_COLUMNS = ["subject_id", "time", "code", "numeric_value"]


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def timeline_table(timelines: ShardTimelines, splits: np.ndarray, prs: np.ndarray, has_prs: np.ndarray) -> pa.Table:
    """The timelines/ rows of one shard in schemas.timeline_schema(K) (as stored: see ehrfm.prs.person.storable)."""
    birth = pa.array(timelines.birth_day.astype(np.int32), pa.int32()).cast(pa.date32())
    return pa.table(
        {
            "subject_id": pa.array(timelines.subject_id, pa.int64()),
            "split": pa.array(np.asarray(SPLITS, dtype=object)[splits].tolist(), pa.string()),
            "birth_date": birth,
            "tokens": timelines.tokens,
            "ages": timelines.ages,
            "prs": float32_vectors(prs),
            "has_prs": pa.array(has_prs, pa.bool_()),
        },
        schema=storable(timeline_schema(prs.shape[1])),
    )


def prs_rows(prs_file: Path, subject_ids: np.ndarray, num_pgs: int) -> tuple[np.ndarray, np.ndarray]:
    """(values [n, K], has_prs [n]) for the subjects of a shard from its prs/ part (zeros when absent)."""
    values = np.zeros((len(subject_ids), num_pgs), dtype=np.float32)
    has = np.zeros(len(subject_ids), dtype=bool)
    if not prs_file.is_file():
        return values, has
    table = pq.read_table(prs_file)
    ids = table["subject_id"].to_numpy()
    pos = np.minimum(np.searchsorted(ids, subject_ids), max(len(ids) - 1, 0))
    found = (ids[pos] == subject_ids) if len(ids) else np.zeros(len(subject_ids), dtype=bool)
    vectors = vectors_to_numpy(table["prs"], num_pgs)
    values[found] = vectors[pos[found]]
    has[found] = table["has_prs"].to_numpy()[pos[found]]
    return values, has


def build_shard(
    events: pa.Table,
    prs_file: Path,
    tokenizer: Tokenizer,
    num_pgs: int,
    ratios: tuple[float, float, float],
    salt: int,
    splits_file: str | None = None,
) -> tuple[pa.Table, dict]:
    """Timelines of one shard's events (working form: `ehrfm.meds.writer.read_shard`) and its counts
    (per split, tokens, UNK)."""
    timelines = tokenizer.tokenize(events)
    splits = subject_split_codes(timelines.subject_id, ratios, salt, splits_file)
    prs, has_prs = prs_rows(prs_file, timelines.subject_id, num_pgs)
    table = timeline_table(timelines, splits, prs, has_prs)
    lengths = np.diff(timelines.tokens.offsets.to_numpy())
    stats = dict(timelines.stats)
    stats["subjects_by_split"] = {name: int((splits == code).sum()) for code, name in enumerate(SPLITS)}
    stats["unk_tokens_by_split"] = {}
    token_values = timelines.tokens.flatten().to_numpy()
    owner = np.repeat(np.arange(len(lengths)), lengths)
    for code, name in enumerate(SPLITS):
        stats["unk_tokens_by_split"][name] = int((token_values[splits[owner] == code] == UNK_ID).sum())
    stats["with_prs"] = int(has_prs.sum())
    return table, {**stats, "lengths": lengths.astype(np.int64)}
