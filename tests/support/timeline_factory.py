"""Tiny tokenized timelines with a known generative truth, in the `timelines/` layout of schemas.py.

Stands in for the preprocessing stage in model and training tests. The process: each person gets
K latent PRS z-scores; events follow a sparse Markov chain over background codes, except that at
every event a "T2D" token is emitted with probability sigmoid(T2D_LOGIT + effect * z[0]). PRS
column 0 therefore raises the T2D rate, and a model that reads the PRS can predict it before any
T2D token has been seen. Non-genotyped people have the same latent risk but zeros on disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ehrfm.constants import BOS_ID, EOS_ID, FIRST_CODE_ID, SPLITS
from ehrfm.schemas import timeline_schema

T2D_TOKEN = FIRST_CODE_ID  # the disease code whose rate PRS column 0 raises
SEX_TOKENS = (FIRST_CODE_ID + 1, FIRST_CODE_ID + 2)
FIRST_BACKGROUND = FIRST_CODE_ID + 3
T2D_LOGIT = -3.2  # ~4% of events at z0 = 0


@dataclass(frozen=True)
class FactoryInfo:
    """What a test needs to know about the timelines it asked for."""

    root: Path  # the DIR holding timelines/
    vocab_size: int
    num_pgs: int
    persons: int
    t2d_token: int = T2D_TOKEN


def _transition_matrix(rng: np.random.Generator, n_codes: int) -> np.ndarray:
    """Sparse-ish Markov transitions so next-token loss has structure beyond the unigram."""
    return rng.dirichlet(np.full(n_codes, 0.1), size=n_codes)


def _timeline(
    rng: np.random.Generator, z0: float, transitions: np.ndarray, length: int, effect: float
) -> tuple[np.ndarray, np.ndarray]:
    n_codes = transitions.shape[0]
    p_t2d = 1.0 / (1.0 + np.exp(-(T2D_LOGIT + effect * z0)))
    tokens = [BOS_ID, SEX_TOKENS[int(rng.integers(2))]]
    state = int(rng.integers(n_codes))
    for _ in range(length):
        if rng.random() < p_t2d:
            tokens.append(T2D_TOKEN)
        else:
            state = int(rng.choice(n_codes, p=transitions[state]))
            tokens.append(FIRST_BACKGROUND + state)
    tokens.append(EOS_ID)
    start_age = int(rng.integers(20 * 365, 60 * 365))
    gaps = rng.exponential(30.0, size=len(tokens)).astype(np.int64)
    gaps[:2] = 0  # BOS and demographics sit at the first age
    ages = start_age + np.cumsum(gaps)
    return np.asarray(tokens, np.int32), ages.astype(np.int32)


def write_timelines(
    root: Path,
    persons: int = 400,
    num_pgs: int = 8,
    vocab_size: int = 40,
    files: int = 2,
    min_events: int = 20,
    max_events: int = 260,
    effect: float = 1.6,
    genotyped_fraction: float = 0.7,
    seed: int = 0,
) -> FactoryInfo:
    """Write `root/timelines/part-*.parquet` + `manifest.json`; same seed, same bytes of data."""
    if vocab_size <= FIRST_BACKGROUND + 2:
        raise ValueError(f"vocab_size must exceed {FIRST_BACKGROUND + 2}")
    rng = np.random.default_rng(seed)
    transitions = _transition_matrix(rng, vocab_size - FIRST_BACKGROUND)
    latent = rng.standard_normal((persons, num_pgs)).astype(np.float32)
    genotyped = rng.random(persons) < genotyped_fraction
    split = rng.choice(len(SPLITS), size=persons, p=[0.7, 0.15, 0.15])
    lengths = rng.integers(min_events, max_events + 1, size=persons)
    out = root / "timelines"
    out.mkdir(parents=True, exist_ok=True)
    rows = [_timeline(rng, float(latent[i, 0]), transitions, int(lengths[i]), effect) for i in range(persons)]
    for part, members in enumerate(np.array_split(np.arange(persons), files)):
        stored = np.where(genotyped[members, None], latent[members], 0.0).astype(np.float32)
        table = pa.table(
            {
                "subject_id": pa.array(members + 1000, pa.int64()),
                "split": pa.array([SPLITS[s] for s in split[members]], pa.string()),
                "birth_date": pa.array(np.full(len(members), 0, np.int32), pa.int32()).cast(pa.date32()),
                "tokens": pa.array([rows[i][0] for i in members], pa.list_(pa.int32())),
                "ages": pa.array([rows[i][1] for i in members], pa.list_(pa.int32())),
                "prs": pa.FixedSizeListArray.from_arrays(pa.array(stored.ravel(), pa.float32()), num_pgs),
                "has_prs": pa.array(genotyped[members], pa.bool_()),
            },
            schema=timeline_schema(num_pgs),
        )
        pq.write_table(table, out / f"part-{part:05d}.parquet")
    manifest = {
        "vocab_size": vocab_size,
        "num_pgs": num_pgs,
        "pgs_ids": [f"PGS{i + 1:06d}" for i in range(num_pgs)],
        "t2d_token": T2D_TOKEN,
        "source": "tests/support/timeline_factory.py",
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return FactoryInfo(root=root, vocab_size=vocab_size, num_pgs=num_pgs, persons=persons)
