"""Count features from MEDS events at each label's prediction time, in the spirit of MEDS-Tab.

Per label row and window (e.g. the last 30 / 365 days / all history, ending at and including the
prediction time): how often each code occurred and the code's last numeric value. Static codes
(null time, e.g. Gender/F) become 0/1 columns and MEDS_BIRTH gives the age. Everything is
polars group-bys into a scipy CSR matrix, so thousands of codes cost memory only where non-zero.
The code vocabulary is fit on training rows only, so no validation/test code leaks into columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import meds
import numpy as np
import polars as pl
import pyarrow as pa
import scipy.sparse as sp

DAYS_PER_YEAR = 365.25
# Sex from the gender code: the vocabulary form the events stage writes with an OMOP concept table
# (`Gender/F`, `Gender/M`) and the concept-id form it writes without one (`GENDER/8532`, `GENDER/8507`).
GENDER_NAMES = {"Gender/F": "female", "Gender/M": "male", "GENDER/8532": "female", "GENDER/8507": "male"}
GENDER_PREFIXES = ("Gender/", "GENDER/")


def _labels_frame(labels: pa.Table | pl.DataFrame) -> pl.DataFrame:
    frame = labels if isinstance(labels, pl.DataFrame) else pl.from_arrow(labels)
    return frame.select(
        pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(pl.Datetime("us"))
    ).with_row_index("row")


def _events_frame(events: pa.Table | pl.DataFrame) -> pl.DataFrame:
    frame = events if isinstance(events, pl.DataFrame) else pl.from_arrow(events)
    return frame.select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("time").cast(pl.Datetime("us")),
        pl.col("code").cast(pl.String),
        pl.col("numeric_value").cast(pl.Float64),
    )


def _window_name(days: int | None) -> str:
    return "all" if days is None else f"{days}d"


def history_by_window(events: pl.DataFrame, labels: pl.DataFrame, windows: tuple[int | None, ...]) -> pl.DataFrame:
    """Long table (row, window, code, count, last_value) over events at or before each prediction time."""
    past = (
        events.filter(pl.col("time").is_not_null() & (pl.col("code") != meds.birth_code))
        .join(labels, on="subject_id", how="inner")
        .filter(pl.col("time") <= pl.col("prediction_time"))
        .with_columns(((pl.col("prediction_time") - pl.col("time")).dt.total_seconds() / 86400.0).alias("age_days"))
        .sort("row", "time")
    )
    parts = []
    for days in windows:
        subset = past if days is None else past.filter(pl.col("age_days") <= days)
        parts.append(
            subset.group_by("row", "code")
            .agg(pl.len().alias("count"), pl.col("numeric_value").drop_nulls().last().alias("last_value"))
            .with_columns(pl.lit(_window_name(days)).alias("window"))
        )
    return pl.concat(parts).select("row", "window", "code", "count", "last_value")


def static_codes(events: pl.DataFrame, labels: pl.DataFrame) -> pl.DataFrame:
    """(row, code) for codes recorded without a time (static facts such as gender)."""
    return (
        events.filter(pl.col("time").is_null() & (pl.col("code") != meds.birth_code))
        .select("subject_id", "code")
        .unique()
        .join(labels, on="subject_id", how="inner")
        .select("row", "code")
    )


def demographics(events: pa.Table | pl.DataFrame, labels: pa.Table | pl.DataFrame) -> pl.DataFrame:
    """Per label row: subject_id, age in years at the prediction time (NaN without MEDS_BIRTH), sex."""
    ev, lab = _events_frame(events), _labels_frame(labels)
    birth = ev.filter(pl.col("code") == meds.birth_code).group_by("subject_id").agg(pl.col("time").min().alias("birth"))
    sex = (
        ev.filter(
            pl.col("code").str.starts_with(GENDER_PREFIXES[0]) | pl.col("code").str.starts_with(GENDER_PREFIXES[1])
        )
        .group_by("subject_id")
        .agg(pl.col("code").first().alias("gender_code"))
    )
    out = (
        lab.join(birth, on="subject_id", how="left")
        .join(sex, on="subject_id", how="left")
        .sort("row")
        .with_columns(
            ((pl.col("prediction_time") - pl.col("birth")).dt.total_seconds() / (86400.0 * DAYS_PER_YEAR))
            .fill_null(float("nan"))
            .alias("age_years"),
            pl.col("gender_code").replace_strict(GENDER_NAMES, default="unknown").fill_null("unknown").alias("sex"),
        )
    )
    return out.select("subject_id", "prediction_time", "age_years", "sex")


@dataclass(frozen=True)
class CodeVocabulary:
    """Columns of the feature matrix: codes to count, codes with values, static codes."""

    count_codes: tuple[str, ...]
    value_codes: tuple[str, ...]
    static_codes: tuple[str, ...]
    windows: tuple[int | None, ...]

    @classmethod
    def fit(
        cls,
        events: pa.Table | pl.DataFrame,
        labels: pa.Table | pl.DataFrame,
        windows: tuple[int | None, ...] = (30, 365, None),
        min_persons: int = 5,
        max_codes: int | None = None,
    ) -> CodeVocabulary:
        """Codes seen (before prediction time) in at least `min_persons` of these (training) rows."""
        ev, lab = _events_frame(events), _labels_frame(labels)
        history = history_by_window(ev, lab, (None,))
        frequent = (
            history.group_by("code")
            .agg(pl.len().alias("rows"), pl.col("last_value").is_not_null().sum().alias("valued"))
            .filter(pl.col("rows") >= min_persons)
            .sort(["rows", "code"], descending=[True, False])
        )
        if max_codes is not None:
            frequent = frequent.head(max_codes)
        statics = static_codes(ev, lab).group_by("code").len().filter(pl.col("len") >= min_persons)
        return cls(
            count_codes=tuple(sorted(frequent["code"].to_list())),
            value_codes=tuple(sorted(frequent.filter(pl.col("valued") >= min_persons)["code"].to_list())),
            static_codes=tuple(sorted(statics["code"].to_list())),
            windows=tuple(windows),
        )

    def names(self) -> list[str]:
        w = [_window_name(d) for d in self.windows]
        return (
            [f"{c}|count|{x}" for x in w for c in self.count_codes]
            + [f"{c}|last|{x}" for x in w for c in self.value_codes]
            + [f"{c}|static" for c in self.static_codes]
            + ["age_years"]
        )


@dataclass
class FeatureMatrix:
    """Label rows x features. `value_columns` marks last-value columns (missing = not measured)."""

    matrix: sp.csr_matrix
    names: list[str]
    value_columns: np.ndarray  # bool per column
    subject_id: np.ndarray
    prediction_time: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.matrix.shape

    def rows(self, mask: np.ndarray) -> FeatureMatrix:
        return FeatureMatrix(
            self.matrix[mask], self.names, self.value_columns, self.subject_id[mask], self.prediction_time[mask]
        )

    def to_dense(self, columns: np.ndarray | None = None) -> np.ndarray:
        """float32 dense array; unmeasured last values are NaN (tree models split on missingness)."""
        cols = np.arange(self.shape[1]) if columns is None else np.asarray(columns)
        sub = self.matrix[:, cols].tocsr()
        dense = sub.toarray().astype(np.float32)
        value_cols = self.value_columns[cols]
        if value_cols.any():
            present = sub.copy()
            present.data = np.ones_like(present.data)
            measured = present.toarray() > 0
            dense[:, value_cols] = np.where(measured[:, value_cols], dense[:, value_cols], np.nan)
        return dense


def build_features(
    events: pa.Table | pl.DataFrame, labels: pa.Table | pl.DataFrame, vocabulary: CodeVocabulary
) -> FeatureMatrix:
    """Counts and last values per (window, code) + static codes + age, one CSR row per label row."""
    ev, lab = _events_frame(events), _labels_frame(labels)
    n_counts, n_values = len(vocabulary.count_codes), len(vocabulary.value_codes)
    window_index = pl.DataFrame(
        {"window": [_window_name(d) for d in vocabulary.windows], "w": list(range(len(vocabulary.windows)))},
        schema={"window": pl.String, "w": pl.Int64},
    )
    count_index = pl.DataFrame(
        {"code": list(vocabulary.count_codes), "c": range(n_counts)}, schema={"code": pl.String, "c": pl.Int64}
    )
    value_index = pl.DataFrame(
        {"code": list(vocabulary.value_codes), "v": range(n_values)}, schema={"code": pl.String, "v": pl.Int64}
    )
    static_index = pl.DataFrame(
        {"code": list(vocabulary.static_codes), "s": range(len(vocabulary.static_codes))},
        schema={"code": pl.String, "s": pl.Int64},
    )
    history = history_by_window(ev, lab, vocabulary.windows).join(window_index, on="window")
    counts = history.join(count_index, on="code").select(
        "row", (pl.col("w") * n_counts + pl.col("c")).alias("col"), pl.col("count").cast(pl.Float64).alias("x")
    )
    value_offset = n_counts * len(vocabulary.windows)
    values = (
        history.filter(pl.col("last_value").is_not_null())
        .join(value_index, on="code")
        .select(
            "row", (value_offset + pl.col("w") * n_values + pl.col("v")).alias("col"), pl.col("last_value").alias("x")
        )
    )
    static_offset = value_offset + n_values * len(vocabulary.windows)
    statics = (
        static_codes(ev, lab)
        .join(static_index, on="code")
        .select("row", (static_offset + pl.col("s")).alias("col"), pl.lit(1.0).alias("x"))
    )
    age_col = static_offset + len(vocabulary.static_codes)
    demo = demographics(ev, lab.drop("row")).with_row_index("row").filter(pl.col("age_years").is_not_nan())
    ages = demo.select("row", pl.lit(age_col, dtype=pl.Int64).alias("col"), pl.col("age_years").alias("x"))
    parts = [
        p.with_columns(pl.col("row").cast(pl.Int64), pl.col("col").cast(pl.Int64))
        for p in (counts, values, statics, ages)
    ]
    entries = pl.concat(parts)
    n_cols = age_col + 1
    matrix = sp.csr_matrix(
        (entries["x"].to_numpy(), (entries["row"].to_numpy(), entries["col"].to_numpy())),
        shape=(lab.height, n_cols),
        dtype=np.float64,
    )
    value_columns = np.zeros(n_cols, dtype=bool)
    value_columns[value_offset:static_offset] = True
    value_columns[age_col] = True  # an unknown birth date is missing, not age zero
    return FeatureMatrix(
        matrix, vocabulary.names(), value_columns, lab["subject_id"].to_numpy(), lab["prediction_time"].to_numpy()
    )
