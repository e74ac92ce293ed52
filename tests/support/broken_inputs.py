"""A corpus of broken OMOP inputs for the one-line-error acceptance tests (issue 19).

`base_cohort` writes a small valid OMOP root (csv, with a SECRET cell that must never reach a
message); each `Case` copies it and breaks one file in one way: the file/format class (empty,
whitespace, truncated or corrupt gzip, truncated/corrupt parquet, binary, UTF-16/32, latin-1),
the schema class (missing or duplicate columns, a stored type that cannot hold the CDM type, two
sources for a table, no person table) and the vocabulary class (lenient cases: exit 0 and a
warning). A case knows the file, table and column its one-line message must name.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SECRET = "SECRET-CELL-4711"  # a cell value: no message may contain it

PERSON_COLS = [
    "person_id",
    "gender_concept_id",
    "year_of_birth",
    "race_concept_id",
    "ethnicity_concept_id",
    "person_source_value",
]
COND_COLS = [
    "condition_occurrence_id",
    "person_id",
    "condition_concept_id",
    "condition_start_date",
    "condition_type_concept_id",
    "condition_source_value",
]
MEAS_COLS = [
    "measurement_id",
    "person_id",
    "measurement_concept_id",
    "measurement_date",
    "measurement_type_concept_id",
    "value_as_number",
]
CONCEPT_COLS = [
    "concept_id",
    "concept_name",
    "domain_id",
    "vocabulary_id",
    "concept_class_id",
    "concept_code",
    "valid_start_date",
    "valid_end_date",
]
ANCESTOR_COLS = ["ancestor_concept_id", "descendant_concept_id", "min_levels_of_separation", "max_levels_of_separation"]
PERSONS = 12
MEASUREMENTS = 2400  # > 64 KiB of csv: a truncated .gz still has a readable header


def _rows(table: str) -> tuple[list[str], list[list[object]]]:
    if table == "person":
        return PERSON_COLS, [
            [p, 8507 + p % 2 * 25, 1950 + p, 0, 0, SECRET if p == 1 else f"p{p}"] for p in range(1, PERSONS + 1)
        ]
    if table == "condition_occurrence":
        return COND_COLS, [[i, i % PERSONS + 1, 201826, f"2005-0{i % 9 + 1}-15", 32020, SECRET] for i in range(1, 40)]
    if table == "measurement":
        return MEAS_COLS, [
            [i, i % PERSONS + 1, 3004410, f"2006-{i % 12 + 1:02d}-{i % 28 + 1:02d}", 32856, 5.0 + i % 7 / 10]
            for i in range(1, MEASUREMENTS + 1)
        ]
    if table == "concept":
        return CONCEPT_COLS, [
            [
                201826,
                "Type 2 diabetes",
                "Condition",
                "SNOMED",
                "Clinical Finding",
                "44054006",
                "1970-01-01",
                "2099-12-31",
            ],
            [3004410, "HbA1c", "Measurement", "LOINC", "Lab Test", "4548-4", "1970-01-01", "2099-12-31"],
        ]
    if table == "concept_ancestor":
        return ANCESTOR_COLS, [[201826, 201826, 0, 0], [3004410, 3004410, 0, 0]]
    raise KeyError(table)


TABLES = ("person", "condition_occurrence", "measurement", "concept", "concept_ancestor")


def csv_text(table: str, drop: tuple[str, ...] = ()) -> str:
    columns, rows = _rows(table)
    keep = [i for i, c in enumerate(columns) if c not in drop]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([columns[i] for i in keep])
    writer.writerows([[row[i] for i in keep] for row in rows])
    return out.getvalue()


def arrow_table(table: str, drop: tuple[str, ...] = ()) -> pa.Table:
    columns, rows = _rows(table)
    return pa.table({c: [row[i] for row in rows] for i, c in enumerate(columns) if c not in drop})


def base_cohort(root: Path) -> Path:
    """A valid OMOP root of csv tables under root/omop."""
    omop = root / "omop"
    omop.mkdir(parents=True, exist_ok=True)
    for table in TABLES:
        (omop / f"{table}.csv").write_text(csv_text(table), encoding="utf-8")
    return omop


def _replace(omop: Path, table: str, name: str, data: bytes) -> None:
    (omop / f"{table}.csv").unlink()
    (omop / name).write_bytes(data)


def _gzip(table: str) -> bytes:
    return gzip.compress(csv_text(table).encode(), mtime=0)


def _parquet_bytes(table: pa.Table, **options: object) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **options)
    return sink.getvalue()


def _corrupt_page(table: str) -> bytes:
    """A parquet file with an intact footer whose first data page header is overwritten: only
    reading the rows finds it (the pre-flight cannot)."""
    data = bytearray(
        _parquet_bytes(arrow_table(table), compression="none", use_dictionary=False, write_statistics=False)
    )
    meta = pq.ParquetFile(io.BytesIO(bytes(data))).metadata
    offset = meta.row_group(0).column(0).data_page_offset
    data[offset : offset + 12] = b"\xff" * 12
    return bytes(data)


def _binary() -> bytes:
    return bytes((i * 37 + 11) % 256 for i in range(4096))


@dataclass(frozen=True)
class Case:
    """One broken input: `breaks` edits a valid OMOP root; the message must name `file`, `table`
    (and `column` when given) and contain `what`. `lenient`: exit 0 with `what` as a warning."""

    name: str
    file: str
    table: str
    column: str | None
    what: str
    breaks: Callable[[Path], None]
    lenient: bool = False
    in_task: bool = False  # found only while rows are read (inside a Ray task for preprocess)

    def build(self, root: Path) -> Path:
        omop = base_cohort(root)
        self.breaks(omop)
        return omop


def _write(name: str, data: bytes, table: str) -> Callable[[Path], None]:
    return lambda omop: _replace(omop, table, name, data)


def _text(name: str, text: str, table: str, encoding: str = "utf-8", bom: bytes = b"") -> Callable[[Path], None]:
    return lambda omop: _replace(omop, table, name, bom + text.encode(encoding))


def _two_sources(omop: Path) -> None:
    (omop / "measurement.parquet").write_bytes(_parquet_bytes(arrow_table("measurement")))


def _no_person(omop: Path) -> None:
    (omop / "person.csv").unlink()


def _latin1(omop: Path) -> None:
    text = csv_text("condition_occurrence").replace(SECRET, "Sj\u00f6gren", 1)
    _replace(omop, "condition_occurrence", "condition_occurrence.csv", text.encode("latin-1"))


def _truncated_gz() -> bytes:
    """Cut before its last block: the header decompresses, the end of the stream does not."""
    return _gzip("measurement")[:-64]


def _corrupt_gz() -> bytes:
    data = bytearray(_gzip("measurement"))
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
    return bytes(data)


def _late_bad_byte_in_a_part(omop: Path) -> None:
    """measurement as a directory of two csv parts (so preprocess runs its cross-file key check),
    the second with a latin-1 byte past the 64 KiB the pre-flight reads: found only while reading."""
    (omop / "measurement.csv").unlink()
    parts = omop / "measurement"
    parts.mkdir()
    text = csv_text("measurement").encode()
    (parts / "part-0.csv").write_bytes(text)
    late = text.rfind(b"32856")
    assert late > 1 << 16
    (parts / "part-1.csv").write_bytes(text[:late] + b"3285\xe9" + text[late + 5 :])


def _truncated_parquet() -> bytes:
    data = _parquet_bytes(arrow_table("measurement"))
    return data[: len(data) // 2]


def _bool_date() -> bytes:
    table = arrow_table("measurement").set_column(3, "measurement_date", pa.array([True] * MEASUREMENTS))
    return _parquet_bytes(table)


CASES: tuple[Case, ...] = (
    # ---- file and format ----
    Case("empty_file", "person.csv", "person", None, "empty file (0 bytes)", _write("person.csv", b"", "person")),
    Case(
        "whitespace_only",
        "condition_occurrence.csv",
        "condition_occurrence",
        None,
        "only whitespace",
        _text("condition_occurrence.csv", "  \n\t\n   \r\n", "condition_occurrence"),
    ),
    Case(
        "blank_first_line",
        "measurement.csv",
        "measurement",
        None,
        "first line is blank",
        _text("measurement.csv", "\n" + csv_text("measurement"), "measurement"),
    ),
    Case(
        "truncated_csv_gz",
        "measurement.csv.gz",
        "measurement",
        None,
        "gzip stream is corrupt or truncated (it breaks after 65,536 decompressed bytes)",
        _write("measurement.csv.gz", _truncated_gz(), "measurement"),
    ),
    Case(
        "corrupt_csv_gz",
        "measurement.csv.gz",
        "measurement",
        None,
        "gzip stream is corrupt or truncated",
        _write("measurement.csv.gz", _corrupt_gz(), "measurement"),
    ),
    Case(
        "plain_text_named_gz",
        "measurement.csv.gz",
        "measurement",
        None,
        "gzip stream is corrupt or truncated",
        _text("measurement.csv.gz", csv_text("measurement"), "measurement"),
    ),
    Case(
        "gzip_named_csv",
        "measurement.csv",
        "measurement",
        None,
        "gzip-compressed data",
        _write("measurement.csv", _gzip("measurement"), "measurement"),
    ),
    Case(
        "truncated_parquet",
        "measurement.parquet",
        "measurement",
        None,
        "not a readable parquet file",
        _write("measurement.parquet", _truncated_parquet(), "measurement"),
    ),
    Case(
        "junk_parquet",
        "measurement.parquet",
        "measurement",
        None,
        "not a readable parquet file",
        _write("measurement.parquet", b"PAR1" + b"not parquet at all " * 50, "measurement"),
    ),
    Case(
        "corrupt_parquet_page",
        "measurement.parquet",
        "measurement",
        None,
        "corrupt parquet data after 0 of 2,400 rows",
        _write("measurement.parquet", _corrupt_page("measurement"), "measurement"),
        in_task=True,
    ),
    Case(
        "late_bad_byte_in_a_part",
        "part-1.csv",
        "measurement",
        None,
        "cannot be parsed as csv after 0 rows (bad encoding or quoting)",
        _late_bad_byte_in_a_part,
        in_task=True,
    ),
    Case(
        "binary_named_csv",
        "condition_occurrence.csv",
        "condition_occurrence",
        None,
        "binary content, not csv text",
        _write("condition_occurrence.csv", _binary(), "condition_occurrence"),
    ),
    Case(
        "utf16_le_bom",
        "person.csv",
        "person",
        None,
        "encoding: UTF-16 (little-endian) text (byte-order mark)",
        _text("person.csv", csv_text("person"), "person", "utf-16-le", codecs.BOM_UTF16_LE),
    ),
    Case(
        "utf16_be_bom",
        "person.csv",
        "person",
        None,
        "encoding: UTF-16 (big-endian) text (byte-order mark)",
        _text("person.csv", csv_text("person"), "person", "utf-16-be", codecs.BOM_UTF16_BE),
    ),
    Case(
        "utf16_le_no_bom",
        "condition_occurrence.csv",
        "condition_occurrence",
        None,
        "UTF-16 (little-endian) text without a byte-order mark",
        _text("condition_occurrence.csv", csv_text("condition_occurrence"), "condition_occurrence", "utf-16-le"),
    ),
    Case(
        "utf32_bom",
        "measurement.csv",
        "measurement",
        None,
        "encoding: UTF-32 (little-endian)",
        _text("measurement.csv", csv_text("measurement"), "measurement", "utf-32-le", codecs.BOM_UTF32_LE),
    ),
    Case(
        "latin1_csv",
        "condition_occurrence.csv",
        "condition_occurrence",
        None,
        "encoding: not UTF-8 text",
        _latin1,
    ),
    # ---- schema ----
    Case(
        "missing_required_csv",
        "measurement.csv",
        "measurement",
        "measurement_date",
        "required CDM v5.4 column missing",
        _text("measurement.csv", csv_text("measurement", drop=("measurement_date",)), "measurement"),
    ),
    Case(
        "missing_required_parquet",
        "measurement.parquet",
        "measurement",
        "person_id",
        "required CDM v5.4 column missing from the header (2,400 rows)",
        _write("measurement.parquet", _parquet_bytes(arrow_table("measurement", drop=("person_id",))), "measurement"),
    ),
    Case(
        "missing_two_required",
        "condition_occurrence.csv",
        "condition_occurrence",
        "{condition_concept_id,condition_start_date}",
        "required CDM v5.4 columns missing",
        _text(
            "condition_occurrence.csv",
            csv_text("condition_occurrence", drop=("condition_concept_id", "condition_start_date")),
            "condition_occurrence",
        ),
    ),
    Case(
        "duplicate_column",
        "person.csv",
        "person",
        None,
        "duplicate column name year_of_birth",
        _text("person.csv", csv_text("person").replace("race_concept_id", "YEAR_OF_BIRTH", 1), "person"),
    ),
    Case(
        "bool_stored_date",
        "measurement.parquet",
        "measurement",
        "measurement_date",
        "stored as bool, which cannot hold CDM date (2,400 rows)",
        _write("measurement.parquet", _bool_date(), "measurement"),
    ),
    Case(
        "concept_without_id",
        "concept.csv",
        "concept",
        "concept_id",
        "required CDM v5.4 column missing",
        _text("concept.csv", csv_text("concept", drop=("concept_id",)), "concept"),
    ),
    Case("two_sources", "measurement.parquet", "measurement", None, "more than one source", _two_sources),
    Case("no_person_table", "person.csv", "person", None, "no person table", _no_person),
)


def _trim_vocabulary(omop: Path) -> None:
    """concept without class and validity dates, concept_ancestor without its levels (a trimmed
    vocabulary export), and person.csv with a UTF-8 byte-order mark: all must be accepted."""
    concept = csv_text("concept", ("concept_class_id", "valid_start_date", "valid_end_date"))
    _replace(omop, "concept", "concept.csv", concept.encode())
    _replace(omop, "concept_ancestor", "concept_ancestor.csv", csv_text("concept_ancestor", ANCESTOR_COLS[2:]).encode())
    _replace(omop, "person", "person.csv", codecs.BOM_UTF8 + csv_text("person").encode())


LENIENT = Case(
    "trimmed_vocabulary_and_utf8_bom",
    "concept.csv",
    "concept",
    "valid_start_date",
    "concept.csv: concept.concept_class_id, concept.valid_start_date, concept.valid_end_date: "
    "CDM v5.4 NOT NULL column(s) absent, read as empty (not needed to build events)",
    _trim_vocabulary,
    lenient=True,
)
ANCESTOR_WARNING = (
    "concept_ancestor.csv: concept_ancestor.min_levels_of_separation, concept_ancestor.max_levels_of_separation: "
    "CDM v5.4 NOT NULL column(s) absent, read as empty (not needed to build events)"
)


def copy_case(case: Case, root: Path) -> Path:
    """A fresh copy of the case's OMOP root under `root` (removed first if present)."""
    shutil.rmtree(root, ignore_errors=True)
    return case.build(root)
