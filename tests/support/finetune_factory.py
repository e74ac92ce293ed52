"""Tiny fine-tuning inputs shared by the fine-tuning and tuning tests: timelines from
tests/support/timeline_factory.py with a tokenizer file, label files whose answer is known, and a randomly
initialised decoder saved as a pretraining checkpoint.

- PRS labels: genotyped people only, label = PRS column 0 > 0. A linear probe can read it only
  through the PRS, so AUROC with the PRS is high and with the PRS masked it is near chance.
- token labels: everyone, label = the window's last token is the T2D token (half the prediction
  times are put on a T2D token). Full fine-tuning must learn it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ehrfm.constants import FIRST_CODE_ID
from ehrfm.model.config import ModelConfig
from ehrfm.model.io import save_model_files
from ehrfm.model.transformer import EHRDecoder
from ehrfm.preprocess.tokenizer import Tokenizer, build_tokenizer, quantile_edges
from tests.support.timeline_factory import T2D_TOKEN, write_timelines

DAY_US = 86_400_000_000


def factory_tokenizer(vocab_size: int) -> Tokenizer:
    """A real tokenizer over the factory's token ids: 10 value tokens from FIRST_CODE_ID (the
    factory's T2D, sex and first background tokens read as bins), 1 gap token, then codes C00...
    by falling count, every code with value bins. So code-then-bin pairs occur in the timelines."""
    n_codes = vocab_size - FIRST_CODE_ID - 11
    counts = {f"C{i:02d}": 1000 - i for i in range(n_codes)}
    edges = {c: quantile_edges(np.arange(100.0), 10) for c in counts}
    tok = build_tokenizer(counts, edges, min_count=1, n_bins=10, min_values_for_bins=20, gap_edges_days=[1])
    assert tok.vocab_size == vocab_size
    return tok


def write_finetune_data(root: Path, persons: int = 600):
    """Timelines (2 files) plus the tokenizer.json a risk model ships; returns the FactoryInfo."""
    info = write_timelines(root, persons=persons, files=2, min_events=12, max_events=80)
    factory_tokenizer(info.vocab_size).save(info.root / "tokenizer.json")
    return info


def timelines_table(info) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((info.root / "timelines").glob("*.parquet")))


def make_labels(info, path: Path, kind: str, seed: int = 0) -> pa.Table:
    """A label file for `kind` ("prs" or "token"), prediction times at token ages (birth = day 0)."""
    rng = np.random.default_rng(seed)
    table = timelines_table(info)
    rows = []
    for sid, tokens, ages, prs, has_prs in zip(
        table["subject_id"].to_pylist(),
        table["tokens"].to_pylist(),
        table["ages"].to_pylist(),
        table["prs"].to_pylist(),
        table["has_prs"].to_pylist(),
    ):
        tokens, ages = np.asarray(tokens), np.asarray(ages)
        candidates = np.arange(2, len(tokens) - 1)
        if kind == "prs":
            if not has_prs:
                continue
            cut = ages[rng.choice(candidates)]
            label = prs[0] > 0
        else:
            t2d = candidates[tokens[candidates] == T2D_TOKEN]
            pick = rng.choice(t2d) if len(t2d) and rng.random() < 0.5 else rng.choice(candidates)
            cut = ages[pick]
            last = np.searchsorted(ages, cut, side="right") - 1  # the window ends at the last token of that day
            label = tokens[last] == T2D_TOKEN
        rows.append((sid, int(cut) * DAY_US, bool(label)))
    labels = pa.table(
        {
            "subject_id": pa.array([r[0] for r in rows], pa.int64()),
            "prediction_time": pa.array([r[1] for r in rows], pa.timestamp("us")),
            "boolean_value": pa.array([r[2] for r in rows]),
        }
    )
    pq.write_table(labels, path)
    return labels


def write_pretrained(info, root: Path) -> Path:
    """A randomly initialised decoder with PRS prefix fusion, saved as a pretraining checkpoint
    (<root>/run/checkpoint_0000010, so <root>/run is a pretraining run directory)."""
    cfg = ModelConfig(
        vocab_size=info.vocab_size,
        num_pgs=info.num_pgs,
        hidden=32,
        layers=2,
        heads=4,
        context=32,
        fusion="prefix",
        prs_tokens=2,
        prs_hidden=32,
        modality_dropout=0.3,
    )
    torch.manual_seed(0)
    directory = root / "run" / "checkpoint_0000010"
    save_model_files(directory, EHRDecoder(cfg).state_dict(), cfg)
    return directory
