"""Event codes in the usual OMOP->MEDS form, and the metadata that maps them back to concepts.

A concept id that the OMOP `concept` table knows becomes `<vocabulary_id>/<concept_code>`
(`SNOMED/44054006`, `Visit/IP`, `Gender/F`), so a dataset reads like any other OMOP-derived MEDS
dataset. A concept id the table lacks (or a cohort without a concept table) keeps the id form
`<DOMAIN>/<concept_id>`; concept id 0 ("no matching concept") stays `<DOMAIN>/0` (the events stage
codes such rows by their source value when it has one). One `CodeBook` does the mapping both
ways, built from the concept table or read back from a dataset's `metadata/codes.parquet`.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa

CONCEPT_COLUMNS = ("concept_id", "concept_name", "vocabulary_id", "concept_code")
ANCESTOR_COLUMNS = ("ancestor_concept_id", "descendant_concept_id")
TABLE_SUFFIXES = (".parquet", ".csv", ".csv.gz", ".tsv", ".tsv.gz")
# Domain prefixes of the id form, as the events stage writes them (`CONDITION/201826`)
ID_FORM_DOMAINS = frozenset(
    ("VISIT", "VISIT_END", "CONDITION", "DRUG", "PROCEDURE", "DEVICE", "MEASUREMENT", "OBSERVATION")
    + ("GENDER", "RACE", "ETHNICITY")
)


class ConceptTableError(ValueError):
    """The concept (or concept_ancestor) table is unreadable or lacks a required column."""


def _table_files(omop_dir: Path, table: str) -> list[Path]:
    """Files of one vocabulary table (`concept.csv`, `CONCEPT.parquet`, `concept/` parts); [] if absent."""
    if not omop_dir.is_dir():
        raise FileNotFoundError(f"OMOP directory not found: {omop_dir}")
    for entry in sorted(omop_dir.iterdir()):
        name = entry.name.lower()
        if entry.is_dir() and name == table:
            return sorted(p for p in entry.iterdir() if p.is_file() and p.name.lower().endswith(TABLE_SUFFIXES))
        if entry.is_file() and name.endswith(TABLE_SUFFIXES) and name.split(".")[0] == table:
            return [entry]
    return []


def _read_file(path: Path, columns: tuple[str, ...]) -> pl.DataFrame:
    """The named columns of one csv/tsv/parquet file, as strings (names lower-cased)."""
    if path.name.lower().endswith(".parquet"):
        frame = pl.read_parquet(path)
    else:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as handle:  # Athena exports are tab-separated; others use commas
            header = handle.readline()
        separator = "\t" if b"\t" in header else ","
        frame = pl.read_csv(
            path, separator=separator, infer_schema=False, quote_char=None if separator == "\t" else '"'
        )
    frame = frame.rename({c: c.lower().lstrip("\ufeff") for c in frame.columns})
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ConceptTableError(f"{path.name}: missing column(s) {', '.join(missing)} ({frame.height} rows)")
    return frame.select(pl.col(c).cast(pl.String) for c in columns)


def read_vocabulary_table(omop_dir: str | Path, table: str, columns: tuple[str, ...]) -> pl.DataFrame | None:
    """One vocabulary table's columns (strings) from an OMOP directory; None when it has no such table."""
    files = _table_files(Path(omop_dir), table)
    if not files:
        return None
    return pl.concat([_read_file(f, columns) for f in files])


def _as_frame(table: pl.DataFrame | pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(table) if isinstance(table, pa.Table) else table
    assert isinstance(frame, pl.DataFrame)
    return frame.rename({c: c.lower() for c in frame.columns})


# metadata/codes.parquet: meds.CodeMetadataSchema's columns plus the OMOP concept id and vocabulary
CODES_METADATA_SCHEMA = pa.schema(
    [
        pa.field("code", pa.string()),
        pa.field("description", pa.string()),
        pa.field("parent_codes", pa.list_(pa.string())),
        pa.field("concept_id", pa.int64()),
        pa.field("vocabulary_id", pa.string()),
    ]
)
CODE_SCHEMA = {"concept_id": pl.Int64, "code": pl.String, "description": pl.String, "vocabulary_id": pl.String}


@dataclass(frozen=True)
class CodeBook:
    """concept id <-> code for the concepts of one cohort's concept table (possibly none).

    `concepts` has one row per known concept id > 0: concept_id (int64), code, description,
    vocabulary_id. Everything else falls back to the id form, so a book built from no table
    reproduces the historical `<DOMAIN>/<concept_id>` codes.
    """

    concepts: pl.DataFrame

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def empty(cls) -> CodeBook:
        return cls(pl.DataFrame(schema=CODE_SCHEMA))

    @classmethod
    def from_concepts(cls, concept: pl.DataFrame | pa.Table | None) -> CodeBook:
        """From an OMOP `concept` table (concept_id, vocabulary_id, concept_code[, concept_name])."""
        if concept is None:
            return cls.empty()
        frame = _as_frame(concept)
        missing = [c for c in ("concept_id", "vocabulary_id", "concept_code") if c not in frame.columns]
        if missing:
            raise ConceptTableError(f"concept table: missing column(s) {', '.join(missing)} ({frame.height} rows)")
        name = pl.col("concept_name").cast(pl.String) if "concept_name" in frame.columns else pl.lit(None, pl.String)
        vocab = pl.col("vocabulary_id").cast(pl.String).str.strip_chars()
        code = pl.col("concept_code").cast(pl.String).str.strip_chars()
        books = (
            frame.select(
                pl.col("concept_id").cast(pl.String).str.strip_chars().cast(pl.Int64, strict=False).alias("concept_id"),
                pl.concat_str([vocab, code], separator="/").alias("code"),
                name.alias("description"),
                vocab.alias("vocabulary_id"),
            )
            .filter(
                (pl.col("concept_id") > 0)
                & (pl.col("vocabulary_id").str.len_chars() > 0)
                & (pl.col("code").str.len_chars() > pl.col("vocabulary_id").str.len_chars() + 1)
            )
            .unique("concept_id", keep="first", maintain_order=True)
        )
        return cls(books.select(pl.col(c).cast(t) for c, t in CODE_SCHEMA.items()))

    @classmethod
    def from_omop_dir(cls, omop_dir: str | Path) -> CodeBook:
        """From the `concept` table of an OMOP directory; the empty book (id form) when it has none."""
        concept = read_vocabulary_table(omop_dir, "concept", ("concept_id", "vocabulary_id", "concept_code"))
        if concept is None:
            return cls.empty()
        names = read_vocabulary_table(omop_dir, "concept", ("concept_id", "concept_name"))
        assert names is not None
        return cls.from_concepts(concept.join(names.unique("concept_id"), on="concept_id", how="left"))

    @classmethod
    def from_codes_metadata(cls, codes: pl.DataFrame | pa.Table | str | Path) -> CodeBook:
        """From a MEDS `metadata/codes.parquet` that carries concept_id (the ones ehrfm writes)."""
        frame = _as_frame(pl.read_parquet(codes) if isinstance(codes, (str, Path)) else codes)
        if "concept_id" not in frame.columns:
            return cls.empty()
        vocab = frame["vocabulary_id"] if "vocabulary_id" in frame.columns else pl.lit(None, pl.String)
        frame = frame.with_columns(vocabulary_id=vocab) if "vocabulary_id" not in frame.columns else frame
        frame = frame.filter(pl.col("concept_id").is_not_null() & (pl.col("concept_id") > 0))
        # only vocabulary-form rows define a mapping; id-form rows are parsed by `concept_id`
        frame = frame.filter(pl.col("vocabulary_id").is_not_null())
        return cls(frame.select(pl.col(c).cast(t) for c, t in CODE_SCHEMA.items()).unique("concept_id", keep="first"))

    # ---- lookups ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.concepts.height

    def code(self, domain: str, concept_id: int | None) -> str:
        """`<vocabulary>/<concept_code>` for a known concept id > 0, else `<domain>/<concept_id or 0>`."""
        return self.codes(domain, [concept_id])[0].as_py()

    def codes(self, domain: str, concept_ids: pa.Array | pa.ChunkedArray | Iterable[int | None]) -> pa.Array:
        """The vectorised `code`: one string per id (null ids are coded as 0, OMOP's 'no matching concept')."""
        if isinstance(concept_ids, pa.ChunkedArray):
            concept_ids = concept_ids.combine_chunks()
        ids = pl.Series("concept_id", concept_ids if isinstance(concept_ids, pa.Array) else list(concept_ids))
        ids = ids.cast(pl.Int64, strict=False).fill_null(0)
        frame = pl.DataFrame({"concept_id": ids}).with_row_index("_row")
        if self.concepts.height:
            frame = frame.join(self.concepts.select("concept_id", "code"), on="concept_id", how="left")
            frame = frame.sort("_row")
        else:
            frame = frame.with_columns(code=pl.lit(None, pl.String))
        fallback = pl.lit(f"{domain}/") + pl.col("concept_id").cast(pl.String)
        out = frame.select(pl.coalesce(pl.col("code"), fallback).alias("code"))["code"]
        return out.to_arrow().cast(pa.string())

    def concept_id(self, code: str) -> int | None:
        """The concept id behind a code: the book's entry, else the id form's id (`CONDITION/201826`, > 0)."""
        hit = self.concepts.filter(pl.col("code") == code)
        if hit.height:
            return int(hit["concept_id"][0])
        head, sep, tail = code.rpartition("/")
        if sep and head in ID_FORM_DOMAINS and tail.isdigit() and int(tail) > 0:
            return int(tail)
        return None

    # ---- metadata/codes.parquet ---------------------------------------------------------------
    def codes_metadata(self, codes: Iterable[str], ancestors: pl.DataFrame | pa.Table | None = None) -> pa.Table:
        """Rows of metadata/codes.parquet for the given dataset codes: code, description, parent_codes,
        concept_id, vocabulary_id (nulls where the book does not know the code).

        parent_codes are the direct parents (min_levels_of_separation 1 when the table has it, else
        every ancestor) from OMOP `concept_ancestor`, in code form, for parents the book knows.
        """
        wanted = pl.DataFrame({"code": sorted(set(codes))}, schema={"code": pl.String})
        rows = wanted.join(self.concepts, on="code", how="left")
        parents = self._parents(ancestors)
        if parents is not None:
            rows = rows.join(parents, on="concept_id", how="left")
        else:
            rows = rows.with_columns(parent_codes=pl.lit(None, pl.List(pl.String)))
        rows = rows.with_columns(pl.col("parent_codes").fill_null(pl.lit([], pl.List(pl.String))))
        table = rows.select(*CODES_METADATA_SCHEMA.names).to_arrow()
        return table.cast(CODES_METADATA_SCHEMA)  # polars writes large types; MEDS wants plain ones

    def _parents(self, ancestors: pl.DataFrame | pa.Table | None) -> pl.DataFrame | None:
        if ancestors is None or not self.concepts.height:
            return None
        frame = _as_frame(ancestors)
        missing = [c for c in ANCESTOR_COLUMNS if c not in frame.columns]
        if missing:
            raise ConceptTableError(f"concept_ancestor: missing column(s) {', '.join(missing)} ({frame.height} rows)")
        ids = [pl.col(c).cast(pl.String).str.strip_chars().cast(pl.Int64, strict=False) for c in ANCESTOR_COLUMNS]
        if "min_levels_of_separation" in frame.columns:
            levels = pl.col("min_levels_of_separation").cast(pl.String).str.strip_chars().cast(pl.Int64, strict=False)
            frame = frame.filter(levels == 1)
        edges = frame.select(ids).drop_nulls().filter(pl.col(ANCESTOR_COLUMNS[0]) != pl.col(ANCESTOR_COLUMNS[1]))
        known = self.concepts.select(pl.col("concept_id").alias(ANCESTOR_COLUMNS[0]), pl.col("code").alias("parent"))
        edges = edges.join(known, on=ANCESTOR_COLUMNS[0], how="inner")
        return (
            edges.group_by(ANCESTOR_COLUMNS[1])
            .agg(pl.col("parent").unique().sort().alias("parent_codes"))
            .rename({ANCESTOR_COLUMNS[1]: "concept_id"})
        )
