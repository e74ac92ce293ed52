"""Label MEDS events for a task: one prediction time per person, a boolean outcome, an exact account.

Rules (all vectorised polars group-bys over one subject-complete shard):
- Visit end = the latest event time among events carrying that visit_id.
- Prediction time = the end of one visit drawn per person from the visits that end strictly before
  the person's last visit end (so the last visit is never chosen). The draw is a hash of
  (seed, subject_id): the same on every shard layout and every run.
- Excluded for prior evidence: any prior-criteria event at or before the prediction time
  (data up to and including the prediction time is history, as in meds.LabelSchema).
- Positive: a target event in (prediction_time, prediction_time + horizon] ("]" when
  horizon_inclusive, ")" otherwise).
- Without an outcome, a record that ends (last event time, death included) before
  prediction_time + horizon is incomplete: excluded (died_before_horizon / lost_to_follow_up) or
  labeled negative, per the task's `censoring`.
Every person in the input gets exactly one status, so persons_in == labeled + sum(excluded).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import meds
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ehrfm.config import usage_errors
from ehrfm.tasks.definitions import CODE_DOMAINS, ResolvedTask, load_task, resolve_task

LABEL_SCHEMA = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("prediction_time", pa.timestamp("us"), nullable=False),
        pa.field("boolean_value", pa.bool_(), nullable=False),
    ]
)
LABELED = "labeled"
PRIOR_REASONS = tuple(f"prior_{d}" for d in (*CODE_DOMAINS, "measurement"))
EXCLUSION_REASONS = ("too_few_visits", *PRIOR_REASONS, "died_before_horizon", "lost_to_follow_up")
REQUIRED_COLUMNS = ("subject_id", "time", "code", "numeric_value", "visit_id")

# Per-person outcome of labeling: the status plus the label when labeled.
STATUS_SCHEMA = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("prediction_time", pa.timestamp("us")),
        pa.field("boolean_value", pa.bool_()),
        pa.field("censored", pa.bool_(), nullable=False),
    ]
)


def subject_uniform(subject_ids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform [0, 1) number per subject from splitmix64(subject_id, seed): stable across shards."""
    with np.errstate(over="ignore"):
        x = subject_ids.astype(np.uint64) ^ np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)


def _as_frame(events: pa.Table | pl.DataFrame, source: str) -> pl.DataFrame:
    frame = events if isinstance(events, pl.DataFrame) else pl.from_arrow(events)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{source}: events lack column(s) {missing} ({frame.height} rows)")
    nulls = frame.select(pl.col("subject_id").null_count(), pl.col("code").null_count()).row(0)
    if any(nulls):
        raise ValueError(f"{source}: {nulls[0]} rows with null subject_id, {nulls[1]} with null code")
    return frame.select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("time").cast(pl.Datetime("us")),
        pl.col("code").cast(pl.String),
        pl.col("numeric_value").cast(pl.Float64),
        pl.col("visit_id").cast(pl.Int64),
    )


def choose_prediction_times(events: pl.DataFrame, seed: int) -> pl.DataFrame:
    """(subject_id, prediction_time) for persons with a visit ending before their last visit end."""
    visits = (
        events.filter(pl.col("visit_id").is_not_null() & pl.col("time").is_not_null())
        .group_by("subject_id", "visit_id")
        .agg(pl.col("time").min().alias("start"), pl.col("time").max().alias("end"))
    )
    candidates = (
        visits.filter(pl.col("end") < pl.col("end").max().over("subject_id"))
        .sort("subject_id", "end", "start", "visit_id")
        .with_columns(pl.int_range(pl.len()).over("subject_id").alias("rank"))
    )
    counts = candidates.group_by("subject_id").agg(pl.len().alias("n")).sort("subject_id")
    draws = subject_uniform(counts["subject_id"].to_numpy(), seed)
    chosen = counts.with_columns(pl.Series("rank", np.floor(draws * counts["n"].to_numpy()).astype(np.int64)))
    return candidates.join(chosen.select("subject_id", "rank"), on=["subject_id", "rank"]).select(
        "subject_id", pl.col("end").alias("prediction_time")
    )


def label_statuses(events: pa.Table | pl.DataFrame, task: ResolvedTask, source: str = "events") -> pl.DataFrame:
    """One row per person in `events` (STATUS_SCHEMA): labeled with a label, or the exclusion reason.

    `events` must hold every event of each person in it (a whole subject-sorted MEDS shard).
    """
    spec = task.definition
    frame = _as_frame(events, source)
    persons = frame.select("subject_id").unique()
    times = choose_prediction_times(frame, spec.seed)
    horizon = pl.duration(days=spec.horizon_days)
    window_end = pl.col("prediction_time") + horizon
    in_history = pl.col("time") <= pl.col("prediction_time")
    after = pl.col("time") > pl.col("prediction_time")
    within = pl.col("time") <= window_end if spec.horizon_inclusive else pl.col("time") < window_end
    prior_domains = task.prior.domains_with_evidence()

    per_person = (
        frame.filter(pl.col("time").is_not_null())
        .join(times, on="subject_id", how="inner")
        .group_by("subject_id")
        .agg(
            pl.col("prediction_time").first(),
            *[(task.prior.domain_expr(d) & in_history).any().alias(f"prior_{d}") for d in prior_domains],
            (task.target.any_expr() & after & within).any().alias("outcome"),
            pl.col("time").max().alias("last_time"),
            (pl.col("code") == meds.death_code).any().alias("died"),
        )
    )
    complete = pl.col("last_time") >= pl.col("prediction_time") + horizon
    status = pl.when(pl.col("prediction_time").is_null()).then(pl.lit("too_few_visits"))
    for domain in prior_domains:
        status = status.when(pl.col(f"prior_{domain}")).then(pl.lit(f"prior_{domain}"))
    incomplete = ~pl.col("outcome") & ~complete
    if spec.censoring == "exclude":
        status = status.when(incomplete & pl.col("died")).then(pl.lit("died_before_horizon"))
        status = status.when(incomplete).then(pl.lit("lost_to_follow_up"))
    status = status.otherwise(pl.lit(LABELED))

    labeled = pl.col("status") == LABELED
    return (
        persons.join(per_person, on="subject_id", how="left")
        .with_columns(status.alias("status"))
        .with_columns(
            pl.when(labeled).then(pl.col("prediction_time")).alias("prediction_time"),
            pl.when(labeled).then(pl.col("outcome")).alias("boolean_value"),
            (labeled & incomplete.fill_null(False)).alias("censored"),
        )
        .select(STATUS_SCHEMA.names)
        .sort("subject_id")
    )


def statuses_to_labels(statuses: pl.DataFrame) -> pa.Table:
    """The labeled persons as a MEDS label table (subject_id, prediction_time, boolean_value)."""
    labeled = statuses.filter(pl.col("status") == LABELED).select(LABEL_SCHEMA.names)
    return labeled.to_arrow().cast(LABEL_SCHEMA)


@dataclass
class LabelAccount:
    """Exact person count: persons_in == labeled + sum(excluded.values())."""

    task: str
    persons_in: int = 0
    labeled: int = 0
    positive: int = 0
    negative: int = 0
    censored_as_negative: int = 0
    excluded: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EXCLUSION_REASONS, 0))
    shards: list[str] = field(default_factory=list)

    def add(self, statuses: pl.DataFrame, shard: str | None = None) -> None:
        counts = dict(statuses.group_by("status").len().iter_rows())
        unknown = set(counts) - {LABELED, *EXCLUSION_REASONS}
        if unknown:
            raise ValueError(f"unknown label statuses {sorted(unknown)}")
        labeled = statuses.filter(pl.col("status") == LABELED)
        self.persons_in += statuses.height
        self.labeled += labeled.height
        self.positive += int(labeled["boolean_value"].sum())
        self.negative += labeled.height - int(labeled["boolean_value"].sum())
        self.censored_as_negative += int(labeled["censored"].sum())
        for reason in EXCLUSION_REASONS:
            self.excluded[reason] += counts.get(reason, 0)
        if shard is not None:
            self.shards.append(shard)

    def check(self) -> None:
        if self.persons_in != self.labeled + sum(self.excluded.values()):
            raise AssertionError(f"label account does not add up: {self.as_dict()}")

    def as_dict(self) -> dict:
        return {
            "task": self.task,
            "persons_in": self.persons_in,
            "labeled": self.labeled,
            "positive": self.positive,
            "negative": self.negative,
            "censored_as_negative": self.censored_as_negative,
            "excluded": dict(self.excluded),
            "shards": list(self.shards),
        }


def label_events(events: pa.Table | pl.DataFrame, task: ResolvedTask) -> tuple[pa.Table, LabelAccount]:
    """Labels and account for one in-memory event table (one or more whole subjects)."""
    statuses = label_statuses(events, task)
    account = LabelAccount(task=task.definition.name)
    account.add(statuses)
    account.check()
    return statuses_to_labels(statuses), account


def label_shard_file(path: str, task: ResolvedTask) -> pl.DataFrame:
    """Statuses for one MEDS shard file; the unit of work for a Ray Data map over shard paths."""
    missing = [c for c in REQUIRED_COLUMNS if c not in pq.read_schema(path).names]
    if missing:
        raise ValueError(f"{Path(path).name}: events lack column(s) {missing}")
    table = pq.read_table(path, columns=list(REQUIRED_COLUMNS))
    return label_statuses(table, task, source=Path(path).name)


def label_shards(
    paths: list[str], task: ResolvedTask, out_dir: Path | None = None, use_ray: bool = False
) -> tuple[pa.Table, LabelAccount]:
    """Label subject-complete shards (sequentially or as Ray tasks); write labels + account if asked.

    A person found in two shards breaks the MEDS sharding rule; that is an error naming the shards.
    """
    if use_ray:
        import ray

        remote = ray.remote(label_shard_file)
        results = ray.get([remote.remote(p, task) for p in paths])
    else:
        results = [label_shard_file(p, task) for p in paths]
    account = LabelAccount(task=task.definition.name)
    seen = pl.concat([r.select("subject_id").with_columns(pl.lit(i).alias("shard")) for i, r in enumerate(results)])
    shared = seen.group_by("subject_id").agg(pl.col("shard").unique()).filter(pl.col("shard").list.len() > 1)
    if shared.height:
        shards = sorted({Path(paths[i]).name for row in shared["shard"].to_list() for i in row})
        raise ValueError(f"{shared.height} subjects appear in more than one shard ({', '.join(shards)})")
    for path, statuses in zip(paths, results):
        account.add(statuses, Path(path).name)
    account.check()
    labels = pa.concat_tables([statuses_to_labels(r) for r in results]) if results else LABEL_SCHEMA.empty_table()
    if out_dir is not None:
        write_labels(labels, account, out_dir)
    return labels, account


def write_labels(labels: pa.Table, account: LabelAccount, out_dir: Path) -> None:
    """`<out>/labels.parquet` (meds.LabelSchema columns) and `<out>/account.json` (counts only)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(labels, out_dir / "labels.parquet")
    (out_dir / "account.json").write_text(json.dumps(account.as_dict(), indent=2))


def event_shards(events_dir: Path) -> list[str]:
    paths = sorted(str(p) for p in Path(events_dir).glob("*.parquet"))
    if not paths:
        raise FileNotFoundError(f"no event shards (*.parquet) in {events_dir}")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ehrfm label", description="label MEDS events for a prediction task")
    parser.add_argument("--events", type=Path, required=True, help="directory of MEDS event shards")
    parser.add_argument("--task", required=True, help="shipped task name (t2d, cad, ...) or a task YAML")
    parser.add_argument("--out", type=Path, required=True, help="output directory for this task's labels")
    parser.add_argument("--omop", type=Path, default=None, help="OMOP dir with concept_ancestor (optional)")
    parser.add_argument("--ray", action="store_true", help="label shards as Ray tasks")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="task overrides (e.g. horizon_days=365)")
    args = parser.parse_args(argv)

    from ehrfm.tasks.concept_sets import find_concept_ancestor, read_concept_ancestor

    ancestry = None
    if args.omop is not None:
        if find_concept_ancestor(args.omop):
            ancestry = read_concept_ancestor(args.omop)
        else:
            print(f"no concept_ancestor under {args.omop}: using the task's concept ids as given", file=sys.stderr)
    with usage_errors(parser):
        task = resolve_task(load_task(args.task, args.overrides), ancestry)
    _, account = label_shards(event_shards(args.events), task, args.out, use_ray=args.ray)
    summary = account.as_dict()
    summary.pop("shards")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
