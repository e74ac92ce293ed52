"""OMOP concept sets: expand seed concept ids to their descendants and turn them into event codes.

Codes come from a `CodeBook` (ehrfm.meds.codes), the same mapping the events stage used:
`<vocabulary_id>/<concept_code>` (`SNOMED/44054006`) for concepts in the cohort's concept table,
the id form `CONDITION/201826` for the others (and for every concept without a book).

A task names a few standard concepts (T2D 201826, metformin 1503297, ...). Real data records the
more specific descendants (e.g. "metformin 500 MG Oral Tablet" under the metformin ingredient), so
each seed id is expanded (`expand_concept`), by one of three paths reported in the label account:
- concept_ancestor: the seed and its descendants in the OMOP `concept_ancestor` table;
- shipped: without concept_ancestor, the shipped list `resources/concept_sets.csv` (standard
  descendants known for the shipped tasks) plus, when the OMOP `concept` table is given, the drug
  concepts whose name contains the seed ingredient's name (clinical and branded drugs);
- as_given: the seed ids only (task `expand_descendants: false`).
With concept_ancestor or shipped, rows without a standard concept (concept id 0, coded
`PREFIX/source/<value>` by the events stage) match through the shipped source codes: ICD-10-CM /
ICD-9-CM prefixes, SNOMED codes and drug ingredient names.
"""

from __future__ import annotations

import csv
import gzip
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import polars as pl
import pyarrow as pa

from ehrfm.meds.codes import CodeBook
from ehrfm.meds.layout import CODES_FILE

# Id-form code prefix for each OMOP domain, as written by the events stage for concepts absent from
# the concept table (`CONDITION/201826`) and for unmapped rows (`CONDITION/source/E11.9`).
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


def concept_codes(domain: str, concept_ids: Iterable[int], codebook: CodeBook | None = None) -> list[str]:
    """Event codes of concept ids in one OMOP domain: `RxNorm/6809` via the book, else `DRUG/1503297`."""
    if domain not in DOMAIN_PREFIX:
        raise ValueError(f"unknown domain {domain!r}; expected one of {sorted(DOMAIN_PREFIX)}")
    ids = [int(c) for c in concept_ids]
    if codebook is None or not ids:
        return [f"{DOMAIN_PREFIX[domain]}/{c}" for c in ids]
    return [str(c) for c in codebook.codes(DOMAIN_PREFIX[domain], ids).to_pylist()]


def codebook_of(concept_table: pl.DataFrame | None) -> CodeBook | None:
    """The CodeBook of a concept table that has vocabulary_id and concept_code; None otherwise."""
    if concept_table is None:
        return None
    names = {c.lower() for c in concept_table.columns}
    if not {"concept_id", "vocabulary_id", "concept_code"} <= names:
        return None
    return CodeBook.from_concepts(concept_table)


# ---- the shipped expansion ----------------------------------------------------------------------
SHIPPED_FILE = "concept_sets.csv"
MATCH_KINDS = ("concept", "icd10cm", "icd9cm", "snomed", "name")


@dataclass(frozen=True)
class ShippedRow:
    seed: int
    domain: str
    match: str
    value: str


@lru_cache(maxsize=1)
def shipped_rows() -> tuple[ShippedRow, ...]:
    """The rows of `ehrfm/tasks/resources/concept_sets.csv` (comment lines skipped)."""
    text = resources.files("ehrfm.tasks").joinpath("resources", SHIPPED_FILE).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    rows = []
    for record in csv.DictReader(lines):
        if record["match"] not in MATCH_KINDS or record["domain"] not in DOMAIN_PREFIX:
            raise ValueError(f"{SHIPPED_FILE}: bad row {record}")
        rows.append(ShippedRow(int(record["seed_concept_id"]), record["domain"], record["match"], record["value"]))
    return tuple(rows)


def _normalise_code(value: str) -> str:
    return re.sub(r"[.\s]", "", value).upper()


@dataclass(frozen=True)
class ConceptExpansion:
    """How seed ids are expanded: path is concept_ancestor, shipped or as_given."""

    path: str = "as_given"
    concept_ancestor: pl.DataFrame | None = None
    concept_table: pl.DataFrame | None = None


@dataclass(frozen=True)
class ExpandedConcept:
    concept_ids: tuple[int, ...]
    source_pattern: str | None  # regex on normalised source values (upper-case, no dots/spaces)
    sources: tuple[str, ...]  # which expansions contributed (for the report)


def source_pattern(rows: Iterable[ShippedRow]) -> str | None:
    """One regex for the source-code rows: prefixes (ICD), exact codes (SNOMED), contained names."""
    parts = []
    for row in rows:
        value = re.escape(_normalise_code(row.value))
        if row.match in ("icd10cm", "icd9cm"):
            parts.append(f"^{value}")
        elif row.match == "snomed":
            parts.append(f"^{value}$")
        elif row.match == "name":
            parts.append(re.escape(row.value.upper().replace(".", "")).replace("\\ ", ""))
    return "|".join(sorted(set(parts))) or None


def drugs_named(concept_table: pl.DataFrame, names: Iterable[str]) -> list[int]:
    """Drug-domain concept ids whose concept_name contains any of `names` (any case)."""
    frame = concept_table.rename({c: c.lower() for c in concept_table.columns})
    if not {"concept_id", "concept_name", "domain_id"} <= set(frame.columns):
        return []
    words = [n.lower() for n in names if n]
    if not words:
        return []
    hit = pl.lit(False)
    for word in words:
        hit = hit | pl.col("concept_name").str.to_lowercase().str.contains(word, literal=True)
    found = frame.filter((pl.col("domain_id") == "Drug") & hit)["concept_id"].cast(pl.Int64, strict=False)
    return [int(c) for c in found.drop_nulls().to_list()]


def expand_concept(domain: str, seed: int, expansion: ConceptExpansion) -> ExpandedConcept:
    """The concept ids and source pattern that stand for `seed` in `domain` under `expansion`."""
    if expansion.path == "as_given":
        return ExpandedConcept((int(seed),), None, ("seed",))
    shipped = [r for r in shipped_rows() if r.seed == int(seed) and r.domain == domain]
    ids = {int(seed)}
    sources = ["seed"]
    if expansion.path == "concept_ancestor":
        ids |= set(expand_descendants([seed], expansion.concept_ancestor))
        sources.append("concept_ancestor")
    else:
        ids |= {int(r.value) for r in shipped if r.match == "concept"}
        sources.append("shipped")
        names = [r.value for r in shipped if r.match == "name"]
        if expansion.concept_table is not None and domain == "drug" and names:
            ids |= set(drugs_named(expansion.concept_table, names))
            sources.append("concept_names")
    pattern = source_pattern(r for r in shipped if r.match != "concept")
    if pattern:
        sources.append("source_codes")
    return ExpandedConcept(tuple(sorted(ids)), pattern, tuple(sources))


def dataset_codebook(path: str | Path) -> CodeBook | None:
    """The CodeBook of the MEDS dataset at or above `path` (its metadata/codes.parquet); None if none.

    Looked for in `path` and up to two levels above it (`<root>/data/<split>` -> `<root>`): the codes
    the events were written with, so a task's concept ids become the same codes.
    """
    start = Path(path).resolve()
    for root in (start, *list(start.parents)[:2]):
        codes = root / CODES_FILE
        if codes.is_file():
            return CodeBook.from_codes_metadata(codes)
    return None


CONCEPT_TABLE_COLUMNS = ("concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_code")


def read_concept_table(omop_dir: str | Path) -> pl.DataFrame | None:
    """OMOP `concept` (the CONCEPT_TABLE_COLUMNS it has, as text) from an OMOP dir; None when absent."""
    root = Path(omop_dir)
    for entry in sorted(root.iterdir()):
        if entry.is_file() and _is_table_file(entry) and entry.name.lower().split(".")[0] == "concept":
            frame = _read_one(entry)
            keep = [c for c in CONCEPT_TABLE_COLUMNS if c in frame.columns]
            return frame.select(keep).with_columns(pl.col(c).cast(pl.String) for c in keep)
    return None
