"""OMOP concept sets: expand seed concept ids to their descendants and turn them into event codes.

A task names a few standard concepts (T2D 201826, metformin 1503297, ...). Real data records the
more specific descendants (e.g. "metformin 500 MG Oral Tablet" under the metformin ingredient), so
the seed ids are expanded through OMOP `concept_ancestor` when that table is available. Without it
the seed ids are used as given; the synthetic cohort records the seed ids themselves.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable
from pathlib import Path

import polars as pl
import pyarrow as pa

# Event code prefix for each OMOP domain, as written by the events stage (`CONDITION/201826`).
DOMAIN_PREFIX = {
    "condition": "CONDITION",
    "drug": "DRUG",
    "measurement": "MEASUREMENT",
    "procedure": "PROCEDURE",
    "observation": "OBSERVATION",
}

ANCESTOR_COLUMNS = ("ancestor_concept_id", "descendant_concept_id")


class ConceptAncestorError(ValueError):
    """The concept_ancestor table is unreadable or lacks a required column."""


def find_concept_ancestor(omop_dir: str | Path) -> list[Path]:
    """Files of the `concept_ancestor` table under an OMOP directory (any case; [] when absent).

    Accepts `concept_ancestor.parquet|.csv|.csv.gz|.tsv` or a `concept_ancestor/` folder of parts.
    """
    root = Path(omop_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"OMOP directory not found: {root}")
    for entry in sorted(root.iterdir()):
        name = entry.name.lower()
        if entry.is_dir() and name == "concept_ancestor":
            return sorted(p for p in entry.iterdir() if p.is_file() and _is_table_file(p))
        if entry.is_file() and _is_table_file(entry) and name.split(".")[0] == "concept_ancestor":
            return [entry]
    return []


def _is_table_file(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((".parquet", ".csv", ".csv.gz", ".tsv", ".tsv.gz")) and not name.startswith(".")


def _read_one(path: Path) -> pl.DataFrame:
    if path.name.lower().endswith(".parquet"):
        frame = pl.read_parquet(path)
    else:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as handle:  # Athena exports are tab-separated; others use commas
            header = handle.readline()
        separator = "\t" if b"\t" in header else ","
        frame = pl.read_csv(path, separator=separator, infer_schema=False)
    return frame.rename({c: c.lower().lstrip("\ufeff") for c in frame.columns})


def read_concept_ancestor(source: str | Path | pa.Table | pl.DataFrame) -> pl.DataFrame:
    """The (ancestor_concept_id, descendant_concept_id) pairs, as int64, from a table or OMOP dir."""
    if isinstance(source, pa.Table):
        frame, where = pl.from_arrow(source), "concept_ancestor table"
    elif isinstance(source, pl.DataFrame):
        frame, where = source, "concept_ancestor table"
    else:
        path = Path(source)
        files = find_concept_ancestor(path) if path.is_dir() else [path]
        if not files:
            raise FileNotFoundError(f"no concept_ancestor table under {path}")
        frames = [_read_one(f) for f in files]
        where = ", ".join(f.name for f in files)
        for file, part in zip(files, frames):
            _require_columns(part, file.name)
        frame = pl.concat([f.select(ANCESTOR_COLUMNS) for f in frames])
    frame = frame.rename({c: c.lower() for c in frame.columns})
    _require_columns(frame, where)
    typed = frame.select(pl.col(c).cast(pl.Int64, strict=False) for c in ANCESTOR_COLUMNS)
    bad = typed.height - typed.drop_nulls().height
    if bad:
        raise ConceptAncestorError(f"{where}: {bad} of {typed.height} rows have a missing or non-integer concept id")
    return typed


def _require_columns(frame: pl.DataFrame, where: str) -> None:
    names = {c.lower() for c in frame.columns}
    missing = [c for c in ANCESTOR_COLUMNS if c not in names]
    if missing:
        raise ConceptAncestorError(f"{where}: missing column(s) {missing} ({frame.height} rows)")


def expand_descendants(concept_ids: Iterable[int], concept_ancestor: pl.DataFrame | None) -> list[int]:
    """Seed ids plus every descendant listed in `concept_ancestor` (sorted, unique)."""
    seeds = sorted({int(c) for c in concept_ids})
    if concept_ancestor is None or not seeds:
        return seeds
    found = concept_ancestor.filter(pl.col("ancestor_concept_id").is_in(seeds))["descendant_concept_id"]
    return sorted(set(seeds) | set(found.to_list()))


def concept_codes(domain: str, concept_ids: Iterable[int]) -> list[str]:
    """Event codes (`DRUG/1503297`) of concept ids in one OMOP domain."""
    if domain not in DOMAIN_PREFIX:
        raise ValueError(f"unknown domain {domain!r}; expected one of {sorted(DOMAIN_PREFIX)}")
    return [f"{DOMAIN_PREFIX[domain]}/{int(c)}" for c in concept_ids]
