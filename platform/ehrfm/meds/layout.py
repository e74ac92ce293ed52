"""Where things live in a MEDS dataset, and the one mapping between ehrfm's and MEDS' split names.

ehrfm keeps `train`/`val`/`test` inside (constants.SPLITS); only the dataset on disk uses the MEDS
names `train`/`tuning`/`held_out`. Every crossing of that boundary goes through `to_meds_split` /
`from_meds_split`.
"""

from __future__ import annotations

from pathlib import Path

import meds
import polars as pl

DATA_DIR = meds.data_subdirectory  # "data"
METADATA_DIR = "metadata"
CODES_FILE = meds.code_metadata_filepath  # "metadata/codes.parquet"
DATASET_FILE = meds.dataset_metadata_filepath  # "metadata/dataset.json"
SPLITS_FILE = meds.subject_splits_filepath  # "metadata/subject_splits.parquet"

TO_MEDS_SPLIT = {"train": meds.train_split, "val": meds.tuning_split, "test": meds.held_out_split}
FROM_MEDS_SPLIT = {meds_name: name for name, meds_name in TO_MEDS_SPLIT.items()}


class NotMedsDatasetError(ValueError):
    """A directory given as a preprocessed dataset is not in the MEDS layout (e.g. the old `events/`)."""


def to_meds_split(name: str) -> str:
    """`val` -> `tuning`, `test` -> `held_out`, `train` -> `train`."""
    return TO_MEDS_SPLIT[name]


def from_meds_split(name: str) -> str:
    """`tuning` -> `val`, `held_out` -> `test`, `train` -> `train`."""
    try:
        return FROM_MEDS_SPLIT[name]
    except KeyError:
        raise ValueError(f"unknown MEDS split {name!r} (expected one of {sorted(FROM_MEDS_SPLIT)})") from None


def data_dir(root: str | Path, split: str | None = None) -> Path:
    """`<root>/data` or `<root>/data/<MEDS split>` for an ehrfm split name."""
    base = Path(root) / DATA_DIR
    return base if split is None else base / to_meds_split(split)


def data_files(root: str | Path) -> list[Path]:
    """Every `data/<split>/*.parquet` of a dataset, sorted; a clear error for the old `events/` layout."""
    root = Path(root)
    base = root / DATA_DIR
    if not base.is_dir():
        if (root / "events").is_dir():
            raise NotMedsDatasetError(
                f"{root} has the old ehrfm layout (events/, splits.parquet); rerun `ehrfm preprocess` "
                "to write the MEDS layout (data/<split>/, metadata/)"
            )
        raise NotMedsDatasetError(f"{root}: no {DATA_DIR}/ directory (not a MEDS dataset)")
    return sorted(base.rglob("*.parquet"))


def read_subject_splits(root: str | Path) -> pl.DataFrame:
    """(subject_id, split) from `metadata/subject_splits.parquet`, splits in ehrfm's names (train/val/test)."""
    path = Path(root) / SPLITS_FILE
    if not path.is_file():
        if (Path(root) / "splits.parquet").is_file():
            raise NotMedsDatasetError(
                f"{root} has the old ehrfm layout (splits.parquet, no {SPLITS_FILE}); rerun `ehrfm preprocess`"
            )
        raise FileNotFoundError(f"{root}: no {SPLITS_FILE}")
    frame = pl.read_parquet(path, columns=["subject_id", "split"])
    unknown = frame.filter(~pl.col("split").is_in(list(FROM_MEDS_SPLIT)))
    if unknown.height:
        raise ValueError(f"{path}: column split has {unknown.height} rows outside {sorted(FROM_MEDS_SPLIT)}")
    return frame.with_columns(pl.col("split").replace_strict(FROM_MEDS_SPLIT, return_dtype=pl.String))
