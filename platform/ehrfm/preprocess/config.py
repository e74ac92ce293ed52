"""Typed configuration of `ehrfm preprocess` (jobs/configs/preprocess-default.yaml sets every key)."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ehrfm.config import StrictModel
from ehrfm.omop.plausibility import DEFAULT_OBSERVATION_SLACK_DAYS, Plausibility, resolve
from ehrfm.preprocess.tokenizer import check_gap_edges

SHARD_FILES = "shard_files"
RAY_SHUFFLE_WITH_SHARD_FILES = "sort_shuffle_pull_based"


class SplitSettings(StrictModel):
    """Person-level split by a hash of subject_id; ratios are normalised to sum to 1."""

    train: float = Field(0.8, ge=0)
    val: float = Field(0.1, ge=0)
    test: float = Field(0.1, ge=0)
    salt: int = 0
    # A MEDS subject_splits.parquet whose splits are kept (train/tuning/held_out -> train/val/test);
    # subjects it does not list are hash-split. `preprocess --meds` sets it from the dataset's metadata.
    subject_splits: str | None = None

    @model_validator(mode="after")
    def _positive_total(self) -> SplitSettings:
        if self.train + self.val + self.test <= 0:
            raise ValueError("split ratios must have a positive sum")
        return self

    @property
    def ratios(self) -> tuple[float, float, float]:
        return (self.train, self.val, self.test)


class TokenizerSettings(StrictModel):
    min_count: int = Field(5, ge=1, description="train events a code needs to enter the vocabulary")
    value_bins: int = Field(10, ge=2, le=100, description="quantile bins per numeric code (Q0..Q9)")
    min_values_for_bins: int = Field(20, ge=2, description="train values a code needs to get bins")
    gap_edges_days: list[int] = Field(default_factory=lambda: [1, 7, 30, 91, 182, 365, 730, 1825])

    @field_validator("gap_edges_days")
    @classmethod
    def _edges(cls, edges: list[int]) -> list[int]:
        check_gap_edges(edges)
        return edges


class PrsSettings(StrictModel):
    column: Literal["SUM", "AVG"] = "SUM"
    sampleset: str | None = None
    adjust_ancestry: bool = True  # when --pcs is given
    # genome build the scores must be on; a file that cannot confirm it gets a report warning
    build: Literal["GRCh37", "GRCh38"] | None = None


class PlausibilitySettings(StrictModel):
    """Date plausibility rules (ehrfm.omop.plausibility): rows breaking them are quarantined."""

    # used when the OMOP root has no cdm_source release date; null: the run date
    extraction_date: dt.date | None = None
    # days a start date may fall after the person's last observation period (null: rule off)
    observation_slack_days: int | None = Field(DEFAULT_OBSERVATION_SLACK_DAYS, ge=0)
    # date columns of plain integers: auto (YYYYMMDD, or days since 1970 when unambiguous) / days_since_1970 / yyyymmdd
    integer_dates: Literal["auto", "days_since_1970", "yyyymmdd"] = "auto"

    def rules(self, root: str) -> Plausibility:
        """The rules for the OMOP data under `root` (its cdm_source release date wins)."""
        return resolve(root, self.extraction_date, self.observation_slack_days, self.integer_dates)


class PreprocessConfig(StrictModel):
    splits: SplitSettings = Field(default_factory=SplitSettings)
    tokenizer: TokenizerSettings = Field(default_factory=TokenizerSettings)
    prs: PrsSettings = Field(default_factory=PrsSettings)
    plausibility: PlausibilitySettings = Field(default_factory=PlausibilitySettings)
    subjects_per_shard: int = Field(10_000, ge=1, description="persons per events/prs/timelines shard")
    min_shards: int = Field(1, ge=1)
    batch_rows: int = Field(100_000, ge=1, description="rows per validation batch inside an ingest task")
    progress_bars: bool = True
    checksum_inputs: bool = True
    # How events reach their shard. "shard_files" (the default): the ingest tasks write each
    # shard's events to files under the run's temp directory (which, like the outputs, every node
    # must see) and one task per shard reads them back; nothing but counts passes through the
    # object store, so memory stays at one shard per task (what 1M persons need; also the fastest
    # at 20k in bench/preprocess.py). The others are Ray Data shuffles behind a groupby: "shuffle_v2" is Ray 2.60's
    # hash shuffle, "sort_shuffle_pull_based" range-partitions and reuses the ordinary workers.
    # All give byte-identical outputs.
    shuffle_strategy: Literal["shard_files", "shuffle_v2", "sort_shuffle_pull_based", "sort_shuffle_push_based"] = (
        SHARD_FILES
    )

    @property
    def ray_shuffle_strategy(self) -> str:
        """The Ray Data shuffle behind the groupbys that stay in Ray (cross-file keys, value-bin edges)."""
        return RAY_SHUFFLE_WITH_SHARD_FILES if self.shuffle_strategy == SHARD_FILES else self.shuffle_strategy
