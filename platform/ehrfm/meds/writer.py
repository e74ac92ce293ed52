"""ehrfm's output as a MEDS dataset: `data/<split>/part-S.parquet`, `metadata/` (codes, dataset, splits).

The events stage keeps its working form in memory (static codes at the birth time, with an ordering
priority); at the boundary `meds_rows` turns it into MEDS (static codes with a null time, first
in their subject, concept ids kept), and `read_shard` turns a shard back into the working form for
the tokenizer and the labelers. The data files of one shard number `S` sit under each split's
directory (a subject is in exactly one), so a shard is still read alone, with no shuffle.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import meds
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ehrfm.constants import SPLITS
from ehrfm.meds.codes import CodeBook
from ehrfm.meds.layout import (
    CODES_FILE,
    DATA_DIR,
    DATASET_FILE,
    SPLITS_FILE,
    NotMedsDatasetError,
    data_files,
    to_meds_split,
)
from ehrfm.omop.events import BIRTH_CODE, CONCEPT_COLUMN, PRIORITY_COLUMN, STATIC_PRIORITIES
from ehrfm.schemas import EVENT_SCHEMA

ETL_NAME = "ehrfm"
# MEDS data rows as ehrfm writes them: the MEDS columns, the visit columns and the OMOP concept id
MEDS_DATA_SCHEMA = pa.schema([*EVENT_SCHEMA, pa.field(CONCEPT_COLUMN, pa.int64(), nullable=True)])


def shard_file(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def meds_rows(events: pa.Table) -> pa.Table:
    """Sorted working events (with `concept_id` and `_priority`) -> MEDS rows in MEDS_DATA_SCHEMA.

    Static codes (priority 1-3: gender, race, ethnicity) get a null time and move to the front of
    their subject; every other row keeps its place, so the file stays sorted by subject and time.
    """
    static = pc.is_in(events[PRIORITY_COLUMN], pa.array(STATIC_PRIORITIES, pa.int8())).to_numpy(zero_copy_only=False)
    subject = events["subject_id"].to_numpy()
    order = np.lexsort((~static, subject))  # stable: subject, then static first, then file order
    time = pc.if_else(pa.array(static), pa.scalar(None, pa.timestamp("us")), events["time"])
    rows = events.set_column(events.schema.get_field_index("time"), "time", time).take(pa.array(order))
    return rows.select(MEDS_DATA_SCHEMA.names).cast(MEDS_DATA_SCHEMA)


def write_shard(rows: pa.Table, split_of_row: np.ndarray, root: str | Path, shard: int) -> list[Path]:
    """One shard's MEDS rows -> `data/<split>/part-S.parquet` for each split that has rows."""
    written = []
    for code, name in enumerate(SPLITS):
        part = rows.filter(pa.array(split_of_row == code))
        if not part.num_rows:
            continue
        meds.DataSchema.validate(part)
        path = Path(root) / DATA_DIR / to_meds_split(name) / shard_file(shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(part, path)
        written.append(path)
    return written


def shard_files(root: str | Path, shard: int) -> list[Path]:
    """The data files of shard S (one per split that has subjects of it)."""
    base = Path(root) / DATA_DIR
    if not base.is_dir():
        data_files(root)  # raises the clear error for the old layout
    return [p for p in (base / to_meds_split(n) / shard_file(shard) for n in SPLITS) if p.is_file()]


def working_events(rows: pa.Table) -> pa.Table:
    """MEDS rows of whole subjects -> the working form: static rows at the subject's birth time,
    sorted by subject and time (stable, so same-time rows keep their file order)."""
    subject = rows["subject_id"].to_numpy()
    time_us = pc.fill_null(rows["time"].cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
    has_time = rows["time"].is_valid().to_numpy(zero_copy_only=False)
    if not has_time.all():
        is_birth = pc.fill_null(pc.equal(rows["code"], BIRTH_CODE), False).to_numpy(zero_copy_only=False)
        is_birth &= has_time
        births = pl.DataFrame({"s": subject[is_birth], "t": time_us[is_birth]}).group_by("s").agg(pl.col("t").min())
        looked = pl.DataFrame({"s": subject}).join(births, on="s", how="left", maintain_order="left")["t"]
        missing = ~has_time & looked.is_null().to_numpy()
        if missing.any():
            n = len(np.unique(subject[missing]))
            raise ValueError(f"MEDS data: {int(missing.sum())} static rows of {n} subjects without {BIRTH_CODE}")
        filled = np.where(has_time, time_us, looked.fill_null(0).to_numpy())
        rows = rows.set_column(
            rows.schema.get_field_index("time"), "time", pa.array(filled, pa.int64()).cast(pa.timestamp("us"))
        )
    return rows.sort_by([("subject_id", "ascending"), ("time", "ascending")])


def read_shard(root: str | Path, shard: int, columns: list[str] | None = None) -> pa.Table:
    """Shard S of a MEDS dataset ehrfm wrote, in the working form (see `working_events`)."""
    files = shard_files(root, shard)
    if not files:
        raise FileNotFoundError(f"{root}: no data files for shard {shard} ({DATA_DIR}/<split>/{shard_file(shard)})")
    wanted = None if columns is None else list(dict.fromkeys(["subject_id", "time", "code", *columns]))
    parts = [pq.read_table(f, columns=wanted) for f in files]
    events = working_events(pa.concat_tables(parts))
    return events if columns is None else events.select(columns)


def shard_numbers(root: str | Path) -> list[int]:
    """The shard numbers S present under data/<split>/part-S.parquet."""
    return sorted({int(p.stem.split("-")[-1]) for p in data_files(root) if p.stem.startswith("part-")})


def read_events(root: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Every subject of a MEDS dataset ehrfm wrote, in the working form (shard by shard)."""
    parts = [read_shard(root, s, columns) for s in shard_numbers(root)]
    if not parts:
        raise NotMedsDatasetError(f"{root}: no {DATA_DIR}/<split>/part-*.parquet files")
    return pa.concat_tables(parts)


# ---- metadata/ ------------------------------------------------------------------------------------
def write_metadata(
    root: str | Path,
    book: CodeBook,
    codes: list[str],
    subjects: np.ndarray,
    split_codes: np.ndarray,
    *,
    ancestors: pl.DataFrame | pa.Table | None = None,
    dataset_name: str = "ehrfm",
    dataset_version: str = "",
) -> dict[str, int]:
    """metadata/codes.parquet, dataset.json and subject_splits.parquet, each checked by `meds`; returns counts."""
    root = Path(root)
    (root / CODES_FILE).parent.mkdir(parents=True, exist_ok=True)
    code_rows = book.codes_metadata(codes, ancestors)
    meds.CodeMetadataSchema.validate(code_rows)
    pq.write_table(code_rows, root / CODES_FILE)
    names = np.asarray([to_meds_split(n) for n in SPLITS], dtype=object)[split_codes]
    splits = pa.table({"subject_id": pa.array(subjects, pa.int64()), "split": pa.array(names.tolist(), pa.string())})
    meds.SubjectSplitSchema.validate(splits)
    pq.write_table(splits, root / SPLITS_FILE)
    ehrfm_version = version("ehrfm")
    dataset = {
        "dataset_name": dataset_name,
        "dataset_version": dataset_version or ehrfm_version,
        "etl_name": ETL_NAME,
        "etl_version": ehrfm_version,
        "meds_version": version("meds"),
        "created_at": datetime.now(UTC).isoformat(),
        "raw_source_id_columns": [CONCEPT_COLUMN, "visit_id"],
        "other_extension_columns": ["visit_type"],
    }
    meds.DatasetMetadataSchema.validate(dataset)
    (root / DATASET_FILE).write_text(json.dumps(dataset, indent=1) + "\n", encoding="utf-8")
    return {
        "codes": code_rows.num_rows,
        "codes_with_concept": code_rows.num_rows - code_rows[CONCEPT_COLUMN].null_count,
    }
