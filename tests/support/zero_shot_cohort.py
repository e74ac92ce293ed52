"""The tiny zero-shot cohort of tests/{unit,integration}/test_zero_shot.py: a tokenizer, timelines, labels and a
random checkpoint of the same vocabulary; and the t2d task it is scored for."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ehrfm.constants import BOS_ID, EOS_ID
from ehrfm.meds.codes import CodeBook
from ehrfm.model import EHRDecoder, ModelConfig, save_model_files
from ehrfm.preprocess.tokenizer import Tokenizer, gap_token_names, value_token_names
from ehrfm.schemas import timeline_schema
from ehrfm.tasks.definitions import ConceptCriteria, TaskDefinition

K = 5  # PRS scores per person
CONCEPTS = pa.table(
    {
        "concept_id": pa.array([201826, 9202], pa.int64()),
        "concept_name": ["Type 2 diabetes mellitus", "Outpatient Visit"],
        "vocabulary_id": ["SNOMED", "Visit"],
        "concept_code": ["44054006", "OP"],
    }
)


def write_tiny_cohort(root, model_seed: int = 0):
    """tokenizer.json + timelines/ + labels + a random checkpoint of the same vocabulary."""
    # Codes as preprocessing writes them with a concept table (T2D 201826 = SNOMED/44054006, outpatient
    # visit 9202 = Visit/OP; conditions the table lacks keep the id form), and the dataset's
    # metadata/codes.parquet that maps them back, where zero-shot finds its target codes.
    book = CodeBook.from_concepts(CONCEPTS)
    codes = ["SNOMED/44054006", "Visit/OP"] + [f"CONDITION/{100 + i}" for i in range(10)]
    (root / "metadata").mkdir()
    pq.write_table(book.codes_metadata(codes), root / "metadata" / "codes.parquet")
    edges = [1, 7, 30, 365]
    names = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"] + value_token_names(10) + gap_token_names(edges) + codes
    tok = Tokenizer(
        tokens=names,
        code_counts=dict.fromkeys(codes, 5),
        value_edges={},
        gap_edges_days=edges,
        n_bins=10,
        min_count=1,
        min_values_for_bins=10,
    )
    tok.save(root / "tokenizer.json")
    rng = np.random.default_rng(0)
    persons, code_ids = 10, [tok.token_id[c] for c in codes[1:]]
    tokens, ages = [], []
    for _ in range(persons):
        n = int(rng.integers(4, 20))
        tokens.append([BOS_ID] + [int(rng.choice(code_ids)) for _ in range(n)] + [EOS_ID])
        ages.append(list(np.linspace(300, 9000, n + 2).astype(int)))
    (root / "timelines").mkdir()
    pq.write_table(
        pa.table(
            {
                "subject_id": pa.array(np.arange(persons) + 1, pa.int64()),
                "split": pa.array(["val", "test"] * (persons // 2), pa.string()),
                "birth_date": pa.array([dt.date(1950, 1, 1)] * persons, pa.date32()),
                "tokens": pa.array(tokens, pa.list_(pa.int32())),
                "ages": pa.array(ages, pa.list_(pa.int32())),
                "prs": pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(persons * K), pa.float32()), K),
                "has_prs": pa.array([True, False] * (persons // 2)),
            },
            schema=timeline_schema(K),
        ),
        root / "timelines" / "part-00000.parquet",
    )
    labels = pa.table(
        {
            "subject_id": pa.array(np.arange(persons) + 1, pa.int64()),
            "prediction_time": pa.array([dt.datetime(1960, 1, 1)] * persons, pa.timestamp("us")),
            "boolean_value": pa.array([i % 3 == 0 for i in range(persons)]),
        }
    )
    pq.write_table(labels, root / "labels.parquet")
    torch.manual_seed(model_seed)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        num_pgs=K,
        hidden=32,
        layers=2,
        heads=4,
        context=16,
        fusion="prefix",
        prs_tokens=2,
        prs_hidden=16,
    )
    save_model_files(root / "ckpt", EHRDecoder(cfg).state_dict(), cfg)
    return tok, labels


T2D_TASK = TaskDefinition(
    name="t2d-tiny", target=ConceptCriteria(condition=[201826, 4226121]), horizon_days=730, expand_descendants=False
)
