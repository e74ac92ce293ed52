"""CodeBook: the OMOP -> MEDS code form (`<vocabulary>/<concept_code>`, id form as fallback) both ways."""

from __future__ import annotations

import meds
import polars as pl
import pyarrow as pa
import pytest

from ehrfm.meds.codes import CodeBook, ConceptTableError
from ehrfm.meds.layout import NotMedsDatasetError, data_files, from_meds_split, to_meds_split

CONCEPTS = pl.DataFrame(
    {
        "concept_id": ["0", "8532", "201826", "9201", "3004410", "42"],
        "concept_name": ["No matching concept", "FEMALE", "Type 2 diabetes mellitus", "Inpatient Visit", "HbA1c", "x"],
        "vocabulary_id": ["None", "Gender", "SNOMED", "Visit", "LOINC", ""],
        "concept_code": ["No matching concept", "F", "44054006", "IP", "4548-4", "x"],
    }
)


@pytest.fixture(scope="module")
def book() -> CodeBook:
    return CodeBook.from_concepts(CONCEPTS)


def test_known_concepts_take_vocabulary_form_others_the_id_form(book: CodeBook) -> None:
    assert len(book) == 4  # id 0 and the concept without a vocabulary are not in the book
    assert book.code("CONDITION", 201826) == "SNOMED/44054006"
    assert book.code("GENDER", 8532) == "Gender/F"
    assert book.code("VISIT", 9201) == "Visit/IP"
    assert book.code("CONDITION", 123) == "CONDITION/123"  # not in the concept table
    assert book.code("CONDITION", 0) == "CONDITION/0"
    assert book.code("OBSERVATION", 42) == "OBSERVATION/42"
    ids = pa.chunked_array([pa.array([3004410, None, 0, 77], pa.int64())])
    assert book.codes("MEASUREMENT", ids).to_pylist() == [
        "LOINC/4548-4",
        "MEASUREMENT/0",
        "MEASUREMENT/0",
        "MEASUREMENT/77",
    ]


def test_codes_keep_order_and_length_for_many_ids(book: CodeBook) -> None:
    ids = [201826, 5, 8532, 201826] * 250
    out = book.codes("CONDITION", ids).to_pylist()
    assert len(out) == 1000
    assert out[:4] == ["SNOMED/44054006", "CONDITION/5", "Gender/F", "SNOMED/44054006"]


def test_empty_book_reproduces_the_id_form() -> None:
    empty = CodeBook.from_concepts(None)
    assert empty.code("DRUG", 1503297) == "DRUG/1503297"
    assert empty.codes("DRUG", []).to_pylist() == []


def test_concept_id_reads_both_forms(book: CodeBook) -> None:
    assert book.concept_id("SNOMED/44054006") == 201826
    assert book.concept_id("Gender/F") == 8532
    assert book.concept_id("CONDITION/123") == 123
    assert book.concept_id("SNOMED/192671") is None  # vocabulary form of a concept the book lacks
    assert book.concept_id("CONDITION/0") is None
    assert book.concept_id("CONDITION/source/E11.9") is None
    assert book.concept_id("MEDS_BIRTH") is None


def test_codes_metadata_round_trips_and_carries_direct_parents(book: CodeBook, tmp_path) -> None:
    ancestors = pl.DataFrame(
        {
            "ancestor_concept_id": ["3004410", "201826", "201826", "9201"],
            "descendant_concept_id": ["201826", "201826", "8532", "8532"],
            "min_levels_of_separation": ["1", "0", "2", "1"],
        }
    )
    table = book.codes_metadata(["SNOMED/44054006", "Gender/F", "MEDS_BIRTH", "CONDITION/123"], ancestors)
    meds.CodeMetadataSchema.validate(table)
    rows = {r["code"]: r for r in table.to_pylist()}
    assert rows["SNOMED/44054006"]["parent_codes"] == ["LOINC/4548-4"]
    assert rows["SNOMED/44054006"]["description"] == "Type 2 diabetes mellitus"
    assert rows["Gender/F"]["parent_codes"] == ["Visit/IP"]  # the level-2 ancestor is not a parent
    assert rows["MEDS_BIRTH"]["concept_id"] is None and rows["MEDS_BIRTH"]["parent_codes"] == []
    path = tmp_path / "codes.parquet"
    pl.from_arrow(table).write_parquet(path)
    back = CodeBook.from_codes_metadata(path)
    assert back.code("CONDITION", 201826) == "SNOMED/44054006"
    assert back.concept_id("Gender/F") == 8532
    assert len(back) == 2  # only the codes the dataset uses


def test_missing_concept_columns_name_the_table() -> None:
    with pytest.raises(ConceptTableError, match=r"concept table: missing column\(s\) concept_code \(1 rows\)"):
        CodeBook.from_concepts(pl.DataFrame({"concept_id": ["1"], "vocabulary_id": ["X"]}))


def test_split_names_map_both_ways_and_old_layout_is_named(tmp_path) -> None:
    assert [to_meds_split(s) for s in ("train", "val", "test")] == ["train", "tuning", "held_out"]
    assert [from_meds_split(s) for s in ("train", "tuning", "held_out")] == ["train", "val", "test"]
    with pytest.raises(ValueError, match="unknown MEDS split 'dev'"):
        from_meds_split("dev")
    (tmp_path / "events").mkdir()
    with pytest.raises(NotMedsDatasetError, match="old ehrfm layout"):
        data_files(tmp_path)
