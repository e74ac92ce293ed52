"""`ehrfm preprocess --meds` on a MEDS dataset written by another tool's conventions: polars'
default writer (large_string codes, ns timestamps, int32 ids, float64 values), its own
subject_splits.parquet kept (held-out subjects stay held out), and no MEDS_BIRTH -> exit 2."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from ehrfm.meds.layout import read_subject_splits
from ehrfm.preprocess.config import PreprocessConfig
from ehrfm.preprocess.job import PreprocessInputs, run_preprocess
from ehrfm.splits import split_codes

pytestmark = pytest.mark.ray
CONFIG = PreprocessConfig.model_validate(
    {
        "tokenizer": {"min_count": 1, "value_bins": 4, "min_values_for_bins": 3},
        "subjects_per_shard": 8,
        "progress_bars": False,
        "shuffle_strategy": "sort_shuffle_pull_based",
    }
)
SUBJECTS = np.arange(100, 140)
HELD_OUT = SUBJECTS[split_codes(SUBJECTS, CONFIG.splits.ratios, 0) == 0][:12]  # the hash says train
TUNING = SUBJECTS[split_codes(SUBJECTS, CONFIG.splits.ratios, 0) == 0][12:16]
UNLISTED = SUBJECTS[30:]  # not in the splits file: hash-split


def _events(subjects: np.ndarray, birth: bool) -> pl.DataFrame:
    rows = []
    for s in subjects.tolist():
        if birth:
            rows.append((s, dt.datetime(1960, 1, 1), "MEDS_BIRTH", None))
        rows.append((s, None, "Gender/F" if s % 2 else "Gender/M", None))
        for year in (2000, 2001):
            rows.append((s, dt.datetime(year, 3, 1), "SNOMED/38341003", None))
            rows.append((s, dt.datetime(year, 3, 1), "LOINC/4548-4", 5.0 + (s % 7) / 2))
    return pl.DataFrame(
        rows,
        schema={"subject_id": pl.Int32, "time": pl.Datetime("ns"), "code": pl.String, "numeric_value": pl.Float64},
        orient="row",
    )


def _write_dataset(root: Path, birth: bool) -> Path:
    """Two data files and metadata/subject_splits.parquet, all through polars' default writer."""
    (root / "data" / "held_out").mkdir(parents=True)
    (root / "data" / "train").mkdir(parents=True)
    _events(SUBJECTS[:20], birth).write_parquet(root / "data" / "held_out" / "0.parquet")
    _events(SUBJECTS[20:], birth).write_parquet(root / "data" / "train" / "0.parquet")
    listed = [s for s in SUBJECTS.tolist() if s not in set(UNLISTED.tolist())]
    split = ["held_out" if s in HELD_OUT else "tuning" if s in TUNING else "train" for s in listed]
    (root / "metadata").mkdir()
    pl.DataFrame({"subject_id": listed, "split": split}).write_parquet(root / "metadata" / "subject_splits.parquet")
    return root


@pytest.fixture(scope="module")
def run(ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = _write_dataset(tmp_path_factory.mktemp("meds_in"), birth=True)
    out = root.parent / "out"
    report = run_preprocess(CONFIG, PreprocessInputs(meds=str(root)), out)
    return {"root": root, "out": out, "report": report}


def test_large_string_codes_are_accepted_and_every_row_kept(run: dict) -> None:
    assert pq.read_schema(run["root"] / "data" / "train" / "0.parquet").field("code").type == "large_string"
    meds_table = run["report"]["tables"]["meds"]
    assert meds_table["rows_in"] == 40 * 6 and meds_table["rows_quarantined"] == 0


def test_official_splits_are_kept_and_held_out_subjects_never_train(run: dict) -> None:
    splits = read_subject_splits(run["out"])  # metadata/subject_splits.parquet, in ehrfm's split names
    split_of = dict(zip(splits["subject_id"].to_list(), splits["split"].to_list()))
    assert len(split_of) == 40
    assert {split_of[s] for s in HELD_OUT.tolist()} == {"test"}  # the hash alone puts all 12 in train
    assert {split_of[s] for s in TUNING.tolist()} == {"val"}
    hashed = split_codes(UNLISTED, CONFIG.splits.ratios, 0)
    assert [split_of[s] for s in UNLISTED.tolist()] == [("train", "val", "test")[c] for c in hashed]
    timelines = pl.concat([pl.read_parquet(p) for p in sorted((run["out"] / "timelines").glob("part-*.parquet"))])
    in_train = set(timelines.filter(pl.col("split") == "train")["subject_id"].to_list())
    assert not in_train & set(HELD_OUT.tolist()) and not in_train & set(TUNING.tolist())
    account = run["report"]["tables"]["meds"]["splits"]
    assert account["from_file"] == {"train": 14, "val": 4, "test": 12}
    assert sum(account["hashed"].values()) == 10
    manifest = json.loads((run["out"] / "timelines" / "manifest.json").read_text())
    assert manifest["counts"]["persons_by_split"]["test"] == 12 + int((hashed == 2).sum())


def test_no_birth_rows_exit_2_with_one_clear_line(ray_cluster, tmp_path: Path, capsys) -> None:
    from ehrfm.cli import run_command

    root = _write_dataset(tmp_path / "meds", birth=False)
    assert run_command("preprocess", ["--meds", str(root), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (
        f"ehrfm preprocess: MEDS input {root}: 40 of 40 subjects have no MEDS_BIRTH row "
        "(code 'MEDS_BIRTH' with the birth time, in 2 data file(s))"
    ) in err
    assert not (tmp_path / "out").exists()
