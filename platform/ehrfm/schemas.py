"""The on-disk contracts between stages: MEDS events, PRS table, tokenized timelines.

Every stage reads the previous stage's output through these schemas, so they are defined once
here. Events follow MEDS (`meds.DataSchema`) with two extra columns; timelines are ehrfm's own.
"""

from __future__ import annotations

import pyarrow as pa

# ---- events/ : MEDS data schema + visit columns (extra columns are allowed by MEDS) -------------
EVENT_SCHEMA = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("time", pa.timestamp("us"), nullable=True),  # null only for static events
        pa.field("code", pa.string(), nullable=False),
        pa.field("numeric_value", pa.float32(), nullable=True),
        pa.field("visit_id", pa.int64(), nullable=True),
        pa.field("visit_type", pa.string(), nullable=True),
    ]
)


# ---- prs/ : one row per person ----------------------------------------------------------------
def prs_schema(num_pgs: int) -> pa.Schema:
    """`prs` holds K float32 z-scores in the order of `prs/pgs_ids.json`; zeros where has_prs is false."""
    return pa.schema(
        [
            pa.field("subject_id", pa.int64(), nullable=False),
            pa.field("prs", pa.list_(pa.float32(), num_pgs), nullable=False),
            pa.field("has_prs", pa.bool_(), nullable=False),
        ]
    )


# ---- timelines/ : one row per person, token ids ready for the model -----------------------------
def timeline_schema(num_pgs: int) -> pa.Schema:
    """Columns of `timelines/*.parquet`.

    `ages[i]` is the person's age in days at token i (the model's age embedding and the labelers'
    clock); `birth_date + ages[i]` is the token's calendar date. `prs` is zeros when has_prs is false.
    """
    return pa.schema(
        [
            pa.field("subject_id", pa.int64(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field("birth_date", pa.date32(), nullable=False),
            pa.field("tokens", pa.list_(pa.int32()), nullable=False),
            pa.field("ages", pa.list_(pa.int32()), nullable=False),
            pa.field("prs", pa.list_(pa.float32(), num_pgs), nullable=False),
            pa.field("has_prs", pa.bool_(), nullable=False),
        ]
    )
