"""Plausibility rules for event dates: the data's extraction date, the observation period, 1900.

A row whose start date is valid but cannot be true is quarantined (reasons in `omop.spec.REASONS`):
  before_1900               start date before 1900-01-01 (placeholder dates such as 1800-01-01)
  after_extraction_date     start date after the date the data was extracted (2150, 9999-12-31)
  after_observation_period  start date more than `observation_slack_days` after the end of the
                            person's last observation period (only when observation_period exists;
                            not applied to death, which registries record after follow-up ends)
The extraction date comes from the OMOP `cdm_source` table (`source_release_date`, else
`cdm_release_date`; the latest when there are several rows), else from the configured date, else
the run date; the report names which one was used. The rules apply to person-linked tables only
(vocabulary tables carry validity dates, not events).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ehrfm.omop.cast import INTEGER_DATE_MODES, IntegerDates, convert_column
from ehrfm.omop.spec import ColumnSpec

EARLIEST_DATE = dt.date(1900, 1, 1)
DEFAULT_OBSERVATION_SLACK_DAYS = 365
CDM_SOURCE = "cdm_source"
RELEASE_COLUMNS = ("source_release_date", "cdm_release_date")  # first one present wins
_EPOCH = dt.date(1970, 1, 1)
_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".parquet", ".pq")


def day_number(day: dt.date) -> int:
    """Days since 1970-01-01."""
    return (day - _EPOCH).days


def day_text(days: int) -> str:
    return (_EPOCH + dt.timedelta(days=int(days))).isoformat()


@dataclass(frozen=True)
class Plausibility:
    """The resolved rules one validation run applies (picklable: it travels in the PersonIndex)."""

    extraction_day: int  # days since 1970; a start date after it is `after_extraction_date`
    extraction_source: str  # "cdm_source.source_release_date", "cdm_source.cdm_release_date", "config" or "run_date"
    observation_slack_days: int | None = DEFAULT_OBSERVATION_SLACK_DAYS  # None: rule off
    integer_dates: str = "auto"  # how date columns of plain integers are read (see omop.cast)
    earliest_day: int = day_number(EARLIEST_DATE)

    def __post_init__(self) -> None:
        if self.integer_dates not in INTEGER_DATE_MODES:
            raise ValueError(f"integer_dates must be one of {', '.join(INTEGER_DATE_MODES)}")

    @classmethod
    def at_run_date(cls) -> Plausibility:
        """Defaults when nothing better is known: the run date is the extraction date."""
        return cls(day_number(dt.date.today()), "run_date")

    @property
    def integer_date_rules(self) -> IntegerDates:
        return IntegerDates(self.integer_dates, latest_day=self.extraction_day)

    def report(self) -> dict:
        """What the report records about the rules (dates and settings only)."""
        return {
            "extraction_date": day_text(self.extraction_day),
            "extraction_date_source": self.extraction_source,
            "earliest_date": day_text(self.earliest_day),
            "observation_slack_days": self.observation_slack_days,
            "integer_dates": self.integer_dates,
        }


def resolve(
    root: str | None,
    extraction_date: dt.date | None = None,
    observation_slack_days: int | None = DEFAULT_OBSERVATION_SLACK_DAYS,
    integer_dates: str = "auto",
) -> Plausibility:
    """The rules for the OMOP data under `root`: cdm_source first, then the configured date, then today."""
    found = release_date(root) if root is not None else None
    if found is not None:
        day, source = found
    elif extraction_date is not None:
        day, source = day_number(extraction_date), "config"
    else:
        day, source = day_number(dt.date.today()), "run_date"
    return Plausibility(day, source, observation_slack_days, integer_dates)


# ---- cdm_source -----------------------------------------------------------------------------------
def _cdm_source_files(root: str) -> list[tuple[pafs.FileSystem, str]]:
    fs, base = pafs.FileSystem.from_uri(root) if "://" in root else (pafs.LocalFileSystem(), str(root))
    files = []
    for entry in fs.get_file_info(pafs.FileSelector(base, recursive=False)):
        name = entry.base_name.lower()
        if entry.type == pafs.FileType.File and any(name == CDM_SOURCE + s for s in _SUFFIXES):
            files.append((fs, entry.path))
        elif entry.type == pafs.FileType.Directory and name == CDM_SOURCE:
            for part in fs.get_file_info(pafs.FileSelector(entry.path, recursive=False)):
                if part.type == pafs.FileType.File and part.base_name.lower().endswith(_SUFFIXES):
                    files.append((fs, part.path))
    return sorted(files, key=lambda item: item[1])


def _read(fs: pafs.FileSystem, path: str) -> pa.Table:
    lower = path.lower()
    if lower.endswith((".parquet", ".pq")):
        return pq.read_table(path, filesystem=fs)
    with fs.open_input_stream(path, compression="gzip" if lower.endswith(".gz") else None) as stream:
        delimiter = "\t" if ".tsv" in lower else ","
        return pacsv.read_csv(
            stream,
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in RELEASE_COLUMNS}),
        )


def release_date(root: str) -> tuple[int, str] | None:
    """(day number, "cdm_source.<column>") of the latest parsable release date, or None.

    An unreadable cdm_source is not an error here: the next source of the extraction date is used
    and the report says which one that was.
    """
    try:
        tables = [_read(fs, path) for fs, path in _cdm_source_files(root)]
    except (OSError, pa.ArrowInvalid):
        return None
    for column in RELEASE_COLUMNS:
        days: list[int] = []
        for table in tables:
            names = {name.lstrip("\ufeff").strip().lower(): name for name in table.column_names}
            if column not in names:
                continue
            try:
                values, _ = convert_column(
                    table[names[column]], ColumnSpec(column, "date", False), IntegerDates("yyyymmdd")
                )
            except (TypeError, ValueError):
                continue
            valid = values.drop_null().cast(pa.int32()).to_numpy(zero_copy_only=False)
            days.extend(int(v) for v in valid)
        if days:
            return int(np.max(days)), f"{CDM_SOURCE}.{column}"
    return None
