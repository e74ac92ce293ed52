"""The pure parts of the one-line input errors (issue 19): encoding sniffing, the message layout,
vocabulary warnings, the pre-flight's cost bound, and finding an input error behind Ray's wrappers."""

from __future__ import annotations

import codecs
import gzip
from pathlib import Path

import pyarrow as pa
import pytest

from ehrfm.omop.encoding import encoding_problem
from ehrfm.omop.files import OmopSchemaError, check_required, missing_expected
from ehrfm.omop.readability import preflight_omop
from ehrfm.omop.spec import CDM_TABLES
from ehrfm.preprocess.job import input_error, one_line
from tests.support.broken_inputs import base_cohort, csv_text

HEADER = "person_id,year_of_birth\n1,1950\n"


@pytest.mark.parametrize(
    ("data", "complete", "expected"),
    [
        (HEADER.encode(), True, None),
        (codecs.BOM_UTF8 + HEADER.encode(), True, None),  # a UTF-8 byte-order mark is accepted
        ("person_id,name\n1,Ærø\n".encode(), True, None),
        ("x,é".encode()[:-1], False, None),  # a character cut at the end of the head is not an error
        ("x,é".encode()[:-1], True, "not UTF-8 text (first invalid byte at offset 2)"),
        (codecs.BOM_UTF16_LE + HEADER.encode("utf-16-le"), True, "UTF-16 (little-endian) text (byte-order mark)"),
        (codecs.BOM_UTF16_BE + HEADER.encode("utf-16-be"), True, "UTF-16 (big-endian) text (byte-order mark)"),
        (codecs.BOM_UTF32_LE + HEADER.encode("utf-32-le"), True, "UTF-32 (little-endian)"),
        (HEADER.encode("utf-16-le"), True, "UTF-16 (little-endian) text without a byte-order mark"),
        (HEADER.encode("utf-16-be"), True, "UTF-16 (big-endian) text without a byte-order mark"),
        (gzip.compress(HEADER.encode()), True, "gzip-compressed data"),
        (b"PK\x03\x04\x00\x00\x08\x00" + bytes(range(256)), True, "binary content, not csv text ("),
        ("person_id\n1,S\u00f8ren\n".encode("latin-1"), True, "not UTF-8 text (first invalid byte at offset 13)"),
    ],
)
def test_encoding_problem_names_what_the_bytes_are(data: bytes, complete: bool, expected: str | None) -> None:
    found = encoding_problem(data, complete)
    assert found == expected if expected is None else expected in found
    assert found is None or "Ærø" not in found and "ren" not in found  # never file content


def test_missing_column_message_layout() -> None:
    columns = ["measurement_id", "person_id", "measurement_concept_id", "measurement_type_concept_id"]
    with pytest.raises(OmopSchemaError) as one:
        check_required(columns, "measurement", "m.parquet", rows=12_345)
    assert str(one.value) == (
        "m.parquet: measurement.measurement_date: required CDM v5.4 column missing from the header (12,345 rows)"
    )
    with pytest.raises(OmopSchemaError) as two:
        check_required(["person_id"], "death", "death.csv")
    assert str(two.value) == "death.csv: death.death_date: required CDM v5.4 column missing from the header"
    with pytest.raises(
        OmopSchemaError, match=r"^c.csv: concept_ancestor\.\{ancestor_concept_id,descendant_concept_id\}"
    ):
        check_required(["min_levels_of_separation"], "concept_ancestor", "c.csv")


def test_vocabulary_tables_need_only_what_ehrfm_uses() -> None:
    assert CDM_TABLES["concept"].required_columns == ["concept_id", "vocabulary_id", "concept_code"]
    assert CDM_TABLES["concept_ancestor"].required_columns == ["ancestor_concept_id", "descendant_concept_id"]
    trimmed = ["concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_code"]
    check_required(trimmed, "concept", "concept.csv")  # no error
    assert missing_expected(trimmed, "concept", "concept.csv") == (
        "concept.csv: concept.concept_class_id, concept.valid_start_date, concept.valid_end_date: "
        "CDM v5.4 NOT NULL column(s) absent, read as empty (not needed to build events)"
    )
    assert missing_expected(CDM_TABLES["concept"].column_names, "concept", "concept.csv") is None
    assert CDM_TABLES["measurement"].expected_columns == []  # clinical tables stay strict


def test_preflight_reads_little_and_bounds_the_gzip_check(tmp_path: Path) -> None:
    omop = base_cohort(tmp_path)
    (omop / "measurement.csv").unlink()
    data = gzip.compress(csv_text("measurement").encode(), mtime=0)
    (omop / "measurement.csv.gz").write_bytes(data[:-64])  # the header still decompresses
    with pytest.raises(
        OmopSchemaError,
        match=r"^measurement.csv.gz: measurement: gzip stream is corrupt or truncated \(it breaks after 65,536 decompressed bytes\)$",
    ):
        preflight_omop(str(omop))
    # above the size bound only the header is read: the truncation is left to the row reader
    checked = preflight_omop(str(omop), gzip_check_bytes=len(data) // 10)
    assert checked.gzip_bytes_checked == 0 and checked.files == 5 and checked.warnings == []
    (omop / "measurement.csv.gz").write_bytes(data)
    assert preflight_omop(str(omop)).gzip_bytes_checked == len(data)


class _Wrapper(Exception):
    """Stands in for a Ray wrapper: the original only in `.cause`."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__("task failed")
        self.cause = cause


def test_input_error_found_behind_wrappers_and_args() -> None:
    original = OmopSchemaError("m.csv: measurement.measurement_date: required CDM v5.4 column missing")
    assert input_error(_Wrapper(original)) is original
    assert input_error(RuntimeError("wrapped", original)) is original  # in the exception's args
    try:
        try:
            raise original
        except OmopSchemaError as exc:
            raise RuntimeError("while running the graph") from exc
    except RuntimeError as chained:
        assert input_error(chained) is original
    assert input_error(RuntimeError("a bug")) is None
    assert input_error(pa.ArrowInvalid("cell text 'SECRET' could not be parsed")) is None  # may quote cells
    assert one_line(OmopSchemaError("a.csv: t: what\nFailed to apply UDF transform after 1/1 attempts")) == (
        "a.csv: t: what"
    )
