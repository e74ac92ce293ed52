"""Reading a MEDS dataset another tool wrote (`ehrfm preprocess --meds DIR`).

Three things a conforming dataset may do that ehrfm's own writer does not, handled here once:
- column types that `meds` itself aligns (large_string / string_view codes from polars' default
  writer, timestamps in ns/ms or with a time zone, int32 subject ids, float64 values): aligned with
  `meds.DataSchema.align` rather than refused;
- no `MEDS_BIRTH` rows: ehrfm needs a birth time to place ages and static codes, so a dataset in
  which no subject has one is refused before any work (one line, with the subject counts) instead
  of every row ending in quarantine;
- its own `metadata/subject_splits.parquet`: honoured (train -> train, tuning -> val, held_out ->
  test, the mapping in `ehrfm.meds.layout`). Subjects the file does not list are split by the usual
  hash of subject_id (`ehrfm.splits.split_codes` with the configured ratios and salt); the report
  counts both groups, so a held-out subject can never land in train.

Messages name files, columns and counts, never values of a row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import meds
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ehrfm.constants import SPLITS
from ehrfm.meds.layout import FROM_MEDS_SPLIT
from ehrfm.splits import split_codes

SPLITS_FILE = meds.subject_splits_filepath  # "metadata/subject_splits.parquet"
_SPLIT_CODE = {name: code for code, name in enumerate(SPLITS)}


class MedsInputError(ValueError):
    """A MEDS input that cannot be read as it is (a ValueError, so the command exits 2 with it)."""


def align_data(table: pa.Table, source: str = "MEDS data") -> pa.Table:
    """`table` in `meds.DataSchema` types (the schema library's own alignment); extra columns kept."""
    try:
        return meds.DataSchema.align(table)
    except Exception as exc:  # the schema library names columns and types, never values
        detail = " ".join(str(exc).split())
        raise MedsInputError(f"{source} does not match meds.DataSchema: {detail}") from None


def _read_columns(path: str, columns: list[str]) -> pa.Table:
    """Two columns of a data file, aligned to their MEDS types (a preflight read: no other columns)."""
    schema = pq.read_schema(path)
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise MedsInputError(f"MEDS data file {Path(path).name}: required column(s) {', '.join(missing)} missing")
    table = pq.read_table(path, columns=columns)
    for name in columns:
        want = meds.DataSchema.schema().field(name).type
        if table.schema.field(name).type != want:
            try:
                table = table.set_column(table.schema.get_field_index(name), name, pc.cast(table[name], want))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise MedsInputError(
                    f"MEDS data file {Path(path).name}: column {name} of type "
                    f"{table.schema.field(name).type} cannot be aligned to {want}"
                ) from None
    return table


@dataclass
class MedsPreflight:
    """What the driver learned from a MEDS dataset before Ray starts (counts only)."""

    files: list[str]
    subjects: int
    subjects_without_birth: int
    splits_file: str | None = None
    splits_listed: dict[str, int] = field(default_factory=dict)  # internal split -> subjects in the file
    warnings: list[str] = field(default_factory=list)

    def report(self) -> dict:
        return {
            "subjects": self.subjects,
            "subjects_without_birth": self.subjects_without_birth,
            "splits_file": Path(self.splits_file).name if self.splits_file else None,
            "splits_listed": self.splits_listed,
        }


def preflight_meds(root: str | Path, files: list[str]) -> MedsPreflight:
    """Subjects and births of a MEDS dataset, its splits file read and checked; refuses a dataset
    in which no subject has a MEDS_BIRTH row (every row would be quarantined)."""
    root = Path(root)
    subjects: list[np.ndarray] = []
    born: list[np.ndarray] = []
    for path in files:
        table = _read_columns(path, ["subject_id", "code"])
        ids = table["subject_id"]
        subjects.append(np.unique(pc.drop_null(ids).to_numpy()))
        birth = pc.fill_null(pc.equal(table["code"], meds.birth_code), False)
        born.append(np.unique(pc.drop_null(pc.filter(ids, birth)).to_numpy()))
    all_subjects = np.unique(np.concatenate(subjects)) if subjects else np.zeros(0, np.int64)
    with_birth = np.unique(np.concatenate(born)) if born else np.zeros(0, np.int64)
    without = int(len(all_subjects) - len(with_birth))
    if len(all_subjects) and len(with_birth) == 0:
        raise MedsInputError(
            f"MEDS input {root}: {without} of {len(all_subjects)} subjects have no {meds.birth_code} row "
            f"(code {meds.birth_code!r} with the birth time, in {len(files)} data file(s)); ehrfm needs "
            "a birth time per subject to place ages and static codes"
        )
    result = MedsPreflight(files=list(files), subjects=int(len(all_subjects)), subjects_without_birth=without)
    if without:
        result.warnings.append(
            f"MEDS input: {without} of {len(all_subjects)} subjects have no {meds.birth_code} row; "
            "their rows are quarantined (reason no_birth_event)"
        )
    splits_path = root / SPLITS_FILE
    if splits_path.is_file():
        assigned = read_subject_splits(str(splits_path))
        result.splits_file = str(splits_path)
        names = np.asarray(SPLITS)[assigned["split"].to_numpy()]
        result.splits_listed = {name: int((names == name).sum()) for name in SPLITS}
    return result


def read_subject_splits(path: str) -> pa.Table:
    """A MEDS subject_splits.parquet as (subject_id int64, split int8 code of constants.SPLITS).

    MEDS names map through ehrfm.meds.layout; any other split name, or a subject listed in two
    splits, is refused (which would be held out?)."""
    name = Path(path).name
    table = pq.read_table(path)
    for column in ("subject_id", "split"):
        if column not in table.column_names:
            raise MedsInputError(f"MEDS splits file {name}: column {column} missing")
    ids = pc.cast(table["subject_id"], pa.int64())
    labels = pc.cast(table["split"], pa.string())
    if ids.null_count or labels.null_count:
        raise MedsInputError(f"MEDS splits file {name}: {ids.null_count + labels.null_count} null subject_id/split")
    found = set(pc.unique(labels).to_pylist())
    unknown = sorted(found - set(FROM_MEDS_SPLIT))
    if unknown:
        raise MedsInputError(
            f"MEDS splits file {name}: split name(s) {unknown} not one of {sorted(FROM_MEDS_SPLIT)} "
            f"({int(pc.sum(pc.is_in(labels, pa.array(unknown))).as_py())} rows)"
        )
    codes = np.zeros(len(labels), dtype=np.int8)
    label_values = labels.to_numpy(zero_copy_only=False)
    for meds_name, internal in FROM_MEDS_SPLIT.items():
        codes[label_values == meds_name] = _SPLIT_CODE[internal]
    out = pa.table({"subject_id": ids, "split": pa.array(codes, pa.int8())})
    unique = out.group_by(["subject_id", "split"]).aggregate([]).group_by("subject_id").aggregate([("split", "count")])
    twice = int(pc.sum(pc.greater(unique["split_count"], 1)).as_py() or 0)
    if twice:
        raise MedsInputError(f"MEDS splits file {name}: {twice} subjects listed in more than one split")
    return out.sort_by("subject_id")


@lru_cache(maxsize=2)
def _assignment(path: str, mtime_ns: int) -> tuple[np.ndarray, np.ndarray]:
    table = read_subject_splits(path)
    ids = table["subject_id"].to_numpy()
    first = np.r_[True, ids[1:] != ids[:-1]] if len(ids) else np.zeros(0, bool)  # a duplicate row: once
    return ids[first], table["split"].to_numpy()[first]


def subject_split_codes(
    subject_ids: np.ndarray, ratios: tuple[float, float, float], salt: int, splits_file: str | None = None
) -> np.ndarray:
    """int8 split code per subject: from `splits_file` (a MEDS subject_splits.parquet) where it lists
    the subject, else the hash split (`ehrfm.splits.split_codes`); the hash split alone without it."""
    codes = split_codes(subject_ids, ratios, salt)
    if not splits_file:
        return codes
    ids, assigned = _assignment(splits_file, Path(splits_file).stat().st_mtime_ns)
    if not len(ids):
        return codes
    subject_ids = np.asarray(subject_ids, dtype=np.int64)
    pos = np.minimum(np.searchsorted(ids, subject_ids), len(ids) - 1)
    listed = ids[pos] == subject_ids
    return np.where(listed, assigned[pos], codes).astype(np.int8)


def split_account(subject_ids: np.ndarray, ratios, salt: int, splits_file: str | None) -> dict:
    """Subjects per split from the file and from the hash rule (the report's account of the rule)."""
    codes = subject_split_codes(subject_ids, ratios, salt, splits_file)
    listed = np.zeros(len(subject_ids), dtype=bool)
    if splits_file:
        ids, _ = _assignment(splits_file, Path(splits_file).stat().st_mtime_ns)
        listed = np.isin(np.asarray(subject_ids, dtype=np.int64), ids)
    return {
        "rule": "subject_splits file where listed, else hash of subject_id" if splits_file else "hash of subject_id",
        "from_file": {name: int(((codes == c) & listed).sum()) for c, name in enumerate(SPLITS)},
        "hashed": {name: int(((codes == c) & ~listed).sum()) for c, name in enumerate(SPLITS)},
    }
