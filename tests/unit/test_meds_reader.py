"""ehrfm.meds.reader: MEDS written by other tools' conventions (types, births, official splits)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ehrfm.meds.reader import (
    MedsInputError,
    align_data,
    preflight_meds,
    read_subject_splits,
    split_account,
    subject_split_codes,
)
from ehrfm.splits import split_codes

RATIOS = (0.8, 0.1, 0.1)


def _data(subjects: list[int], birth: bool, code_type=pa.large_string(), unit="ns") -> pa.Table:
    rows = []
    for s in subjects:
        if birth:
            rows.append((s, dt.datetime(1970, 1, 1), "MEDS_BIRTH", None))
        rows.append((s, None, "Gender/F", None))
        rows.append((s, dt.datetime(2000, 1, 1), "LOINC/4548-4", 6.1))
    ids, times, codes, values = zip(*rows)
    return pa.table(
        {
            "subject_id": pa.array(ids, pa.int32()),
            "time": pa.array(times, pa.timestamp(unit)),
            "code": pa.array(codes, code_type),
            "numeric_value": pa.array(values, pa.float64()),
            "concept_id": pa.array([1] * len(ids), pa.int64()),  # an extra column MEDS allows
        }
    )


def _dataset(root: Path, tables: list[pa.Table], splits: dict[int, str] | None = None) -> list[str]:
    (root / "data" / "train").mkdir(parents=True)
    files = []
    for i, table in enumerate(tables):
        files.append(str(root / "data" / "train" / f"{i}.parquet"))
        pq.write_table(table, files[-1])
    if splits is not None:
        (root / "metadata").mkdir()
        pq.write_table(
            pa.table(
                {
                    "subject_id": pa.array(list(splits), pa.int64()),
                    "split": pa.array(list(splits.values()), pa.large_string()),
                }
            ),
            root / "metadata" / "subject_splits.parquet",
        )
    return files


@pytest.mark.parametrize("code_type", [pa.large_string(), pa.string_view(), pa.string()])
@pytest.mark.parametrize("unit", ["ns", "ms", "us"])
def test_other_writers_types_align_to_the_meds_schema(code_type, unit) -> None:
    aligned = align_data(_data([7, 8], birth=True, code_type=code_type, unit=unit))
    assert aligned.schema.field("subject_id").type == pa.int64()
    assert aligned.schema.field("time").type == pa.timestamp("us")
    assert aligned.schema.field("code").type == pa.string()
    assert aligned.schema.field("numeric_value").type == pa.float32()
    assert aligned.column_names[-1] == "concept_id" and aligned.num_rows == 6
    assert aligned["time"].null_count == 2  # static rows keep their null time


def test_a_table_without_a_required_column_is_one_line_naming_it() -> None:
    with pytest.raises(MedsInputError, match=r"^shard 3 does not match meds.DataSchema: .*code") as caught:
        align_data(_data([1], birth=True).drop_columns(["code"]), "shard 3")
    assert "\n" not in str(caught.value)


def test_no_birth_rows_is_refused_naming_how_many_subjects_lack_them(tmp_path: Path) -> None:
    files = _dataset(tmp_path, [_data([1, 2, 3], birth=False), _data([4], birth=False)])
    with pytest.raises(MedsInputError) as caught:
        preflight_meds(tmp_path, files)
    message = str(caught.value)
    assert "4 of 4 subjects have no MEDS_BIRTH row" in message and "2 data file(s)" in message
    assert "\n" not in message


def test_some_subjects_without_birth_are_counted_in_a_warning(tmp_path: Path) -> None:
    files = _dataset(tmp_path, [_data([1, 2], birth=True), _data([3], birth=False)])
    check = preflight_meds(tmp_path, files)
    assert (check.subjects, check.subjects_without_birth, check.splits_file) == (3, 1, None)
    assert check.warnings == [
        "MEDS input: 1 of 3 subjects have no MEDS_BIRTH row; their rows are quarantined (reason no_birth_event)"
    ]


def test_official_splits_are_read_with_meds_names_mapped(tmp_path: Path) -> None:
    splits = {10: "train", 11: "tuning", 12: "held_out", 13: "held_out"}
    files = _dataset(tmp_path, [_data(list(splits), birth=True)], splits)
    check = preflight_meds(tmp_path, files)
    assert check.splits_listed == {"train": 1, "val": 1, "test": 2}
    table = read_subject_splits(check.splits_file)
    assert table.to_pydict() == {"subject_id": [10, 11, 12, 13], "split": [0, 1, 2, 2]}


def test_unknown_split_names_and_doubly_listed_subjects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"subject_id": [1, 2, 3], "split": ["train", "validation", "validation"]}), path)
    with pytest.raises(MedsInputError, match=r"split name\(s\) \['validation'\] .* \(2 rows\)"):
        read_subject_splits(str(path))
    pq.write_table(pa.table({"subject_id": [1, 1], "split": ["train", "held_out"]}), path)
    with pytest.raises(MedsInputError, match="1 subjects listed in more than one split"):
        read_subject_splits(str(path))


def test_listed_subjects_keep_their_split_and_the_rest_are_hash_split(tmp_path: Path) -> None:
    ids = np.arange(1, 201, dtype=np.int64)
    hashed = split_codes(ids, RATIOS, 0)
    train_by_hash = ids[hashed == 0][:30]  # subjects the hash would put in train ...
    path = tmp_path / "subject_splits.parquet"
    pq.write_table(
        pa.table({"subject_id": train_by_hash, "split": ["held_out"] * 20 + ["tuning"] * 10}), path
    )  # ... listed as held out / tuning: the file wins
    codes = subject_split_codes(ids, RATIOS, 0, str(path))
    listed = np.isin(ids, train_by_hash)
    assert (codes[np.isin(ids, train_by_hash[:20])] == 2).all() and (codes[np.isin(ids, train_by_hash[20:])] == 1).all()
    assert np.array_equal(codes[~listed], hashed[~listed])
    assert np.array_equal(subject_split_codes(ids, RATIOS, 0, None), hashed)
    account = split_account(ids, RATIOS, 0, str(path))
    assert account["from_file"] == {"train": 0, "val": 10, "test": 20}
    assert sum(account["hashed"].values()) == 170
    assert account["hashed"]["train"] == int((hashed[~listed] == 0).sum())
