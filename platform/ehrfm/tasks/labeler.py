"""Label MEDS events for a task: prediction times per person, a boolean outcome, an exact account.

Rules (all vectorised polars group-bys over one subject-complete shard):
- Visit end = the latest event time among events carrying that visit_id.
- Candidate prediction times = the ends of visits that end strictly before the person's last visit
  end (so the last visit is never chosen). The task's `prediction_times` picks among them:
  `random_visit` draws one per person by a hash of (seed, subject_id); `landmarks` keeps the first
  candidate of each `min_gap_days` window (0: every candidate), at most `max_per_person` (a hashed
  draw when more). Draws are the same on every shard layout and every run.
- Per prediction time: excluded for prior evidence (any prior-criteria event at or before it: data
  up to and including the prediction time is history, as in meds.LabelSchema).
- Positive: a target event in (prediction_time, prediction_time + horizon] ("]" when
  horizon_inclusive, ")" otherwise).
- Without an outcome, a record that ends (last event time, death included) before
  prediction_time + horizon is incomplete: excluded (died_before_horizon / lost_to_follow_up) or
  labeled negative, per the task's `censoring`.
- Drugs listed as `drug_outside_inpatient` (insulin) count only on events outside inpatient visits
  (visit_type in the task's inpatient_visit_types).
Account: every prediction time (and one row per person without candidates, too_few_visits) gets
exactly one status, so prediction_times == labeled + sum(excluded); every person is labeled (at
least one labeled time) or excluded for the reason of their earliest prediction time, so
persons_in == persons_labeled + sum(persons_excluded). The account also says how the concept sets
were expanded and how many persons each concept matched (counts only, never rows).
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
from ehrfm.meds.codes import CodeBook
from ehrfm.meds.layout import DATA_DIR
from ehrfm.small_counts import binary_hidden, is_small, public_partition, show
from ehrfm.tasks.aces import aces_yaml
from ehrfm.tasks.definitions import CODE_DOMAINS, INPATIENT, ResolvedTask, load_task, resolve_task

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
OPTIONAL_COLUMNS = ("visit_type",)  # inpatient test for drug_outside_inpatient; absent = not inpatient

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
    visit_type = pl.col("visit_type").cast(pl.String) if "visit_type" in frame.columns else pl.lit(None, pl.String)
    return frame.select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("time").cast(pl.Datetime("us")),
        pl.col("code").cast(pl.String),
        pl.col("numeric_value").cast(pl.Float64),
        pl.col("visit_id").cast(pl.Int64),
        visit_type.alias("visit_type"),
    )


def candidate_times(events: pl.DataFrame) -> pl.DataFrame:
    """(subject_id, end, rank) of visits ending before the person's last visit end, in time order."""
    visits = (
        events.filter(pl.col("visit_id").is_not_null() & pl.col("time").is_not_null())
        .group_by("subject_id", "visit_id")
        .agg(pl.col("time").min().alias("start"), pl.col("time").max().alias("end"))
    )
    return (
        visits.filter(pl.col("end") < pl.col("end").max().over("subject_id"))
        .sort("subject_id", "end", "start", "visit_id")
        .with_columns(pl.int_range(pl.len()).over("subject_id").alias("rank"))
    )


def choose_prediction_times(events: pl.DataFrame, seed: int, times=None) -> pl.DataFrame:
    """(subject_id, prediction_time) per the task's `prediction_times` (one random visit by default)."""
    candidates = candidate_times(events)
    strategy = "random_visit" if times is None else times.strategy
    if strategy == "random_visit":
        counts = candidates.group_by("subject_id").agg(pl.len().alias("n")).sort("subject_id")
        draws = subject_uniform(counts["subject_id"].to_numpy(), seed)
        chosen = counts.with_columns(pl.Series("rank", np.floor(draws * counts["n"].to_numpy()).astype(np.int64)))
        return candidates.join(chosen.select("subject_id", "rank"), on=["subject_id", "rank"]).select(
            "subject_id", pl.col("end").alias("prediction_time")
        )
    gap_us = times.min_gap_days * 86_400_000_000
    first = pl.col("end").min().over("subject_id")
    window = (pl.col("end") - first).dt.total_microseconds() // gap_us if gap_us else pl.col("rank").cast(pl.Int64)
    kept = candidates.unique(subset=["subject_id", "end"], keep="first", maintain_order=True)
    kept = kept.with_columns(window.alias("window")).unique(
        subset=["subject_id", "window"], keep="first", maintain_order=True
    )
    # A hashed draw of max_per_person landmarks per person (stable across shards and runs).
    keys = kept["subject_id"].to_numpy().astype(np.uint64) * np.uint64(1_000_003) + kept["rank"].to_numpy().astype(
        np.uint64
    )
    kept = kept.with_columns(pl.Series("draw", subject_uniform(keys, seed)))
    kept = kept.with_columns(pl.col("draw").rank("ordinal").over("subject_id").alias("order"))
    return (
        kept.filter(pl.col("order") <= times.max_per_person)
        .sort("subject_id", "end")
        .select("subject_id", pl.col("end").alias("prediction_time"))
    )


def _with_inpatient(frame: pl.DataFrame, task: ResolvedTask) -> pl.DataFrame:
    inpatient = pl.col("visit_type").is_in(list(task.definition.inpatient_visit_types)).fill_null(False)
    return frame.with_columns(inpatient.alias(INPATIENT))


def label_statuses(events: pa.Table | pl.DataFrame, task: ResolvedTask, source: str = "events") -> pl.DataFrame:
    """One row per prediction time (STATUS_SCHEMA): labeled with a label, or the exclusion reason.

    A person without any candidate prediction time gets one row, too_few_visits, with a null time.
    `events` must hold every event of each person in it (a whole subject-sorted MEDS shard).
    """
    spec = task.definition
    frame = _with_inpatient(_as_frame(events, source), task).filter(pl.col("time").is_not_null())
    persons = _as_frame(events, source).select("subject_id").unique()
    times = choose_prediction_times(frame, spec.seed, spec.prediction_times)
    horizon = pl.duration(days=spec.horizon_days)
    prior_domains = task.prior.domains_with_evidence()

    # Per person: the first prior evidence per domain, the end of the record, death.
    per_person = frame.group_by("subject_id").agg(
        *[pl.col("time").filter(task.prior.domain_expr(d)).min().alias(f"first_prior_{d}") for d in prior_domains],
        pl.col("time").max().alias("last_time"),
        (pl.col("code") == meds.death_code).any().alias("died"),
    )
    # Per prediction time: a target event inside the window (target events are few: join them).
    targets = frame.filter(task.target.any_expr()).select("subject_id", pl.col("time").alias("target_time"))
    window_end = pl.col("prediction_time") + horizon
    within = pl.col("target_time") <= window_end if spec.horizon_inclusive else pl.col("target_time") < window_end
    outcome = (
        times.join(targets, on="subject_id", how="inner")
        .filter((pl.col("target_time") > pl.col("prediction_time")) & within)
        .select("subject_id", "prediction_time")
        .unique()
        .with_columns(pl.lit(True).alias("outcome"))
    )
    rows = (
        times.join(per_person, on="subject_id", how="left")
        .join(outcome, on=["subject_id", "prediction_time"], how="left")
        .with_columns(pl.col("outcome").fill_null(False))
    )
    complete = pl.col("last_time") >= pl.col("prediction_time") + horizon
    status = pl.when(pl.lit(False)).then(pl.lit(None, pl.String))
    for domain in prior_domains:
        prior = (pl.col(f"first_prior_{domain}") <= pl.col("prediction_time")).fill_null(False)
        status = status.when(prior).then(pl.lit(f"prior_{domain}"))
    incomplete = ~pl.col("outcome") & ~complete
    if spec.censoring == "exclude":
        status = status.when(incomplete & pl.col("died")).then(pl.lit("died_before_horizon"))
        status = status.when(incomplete).then(pl.lit("lost_to_follow_up"))
    status = status.otherwise(pl.lit(LABELED))
    labeled = pl.col("status") == LABELED
    timed = rows.with_columns(status.alias("status")).select(
        "subject_id",
        "status",
        "prediction_time",
        pl.when(labeled).then(pl.col("outcome")).alias("boolean_value"),
        (labeled & incomplete.fill_null(False)).alias("censored"),
    )
    without = persons.join(times.select("subject_id").unique(), on="subject_id", how="anti").select(
        "subject_id",
        pl.lit("too_few_visits").alias("status"),
        pl.lit(None, pl.Datetime("us")).alias("prediction_time"),
        pl.lit(None, pl.Boolean).alias("boolean_value"),
        pl.lit(False).alias("censored"),
    )
    return pl.concat([timed, without]).select(STATUS_SCHEMA.names).sort("subject_id", "prediction_time")


def concept_persons(events: pa.Table | pl.DataFrame, task: ResolvedTask, source: str = "events") -> dict[str, int]:
    """Persons with at least one event matching each concept (`target:condition/201826`, ...), any time."""
    frame = _with_inpatient(_as_frame(events, source), task)
    exprs = {}
    for role, criteria in (("target", task.target), ("prior", task.prior)):
        for concept in criteria.concepts:
            exprs[f"{role}:{concept.key}"] = concept.expr()
    if not exprs:
        return {}
    flags = frame.group_by("subject_id").agg(*[e.any().alias(k) for k, e in exprs.items()])
    return {k: int(v) for k, v in flags.select(pl.col(k).sum() for k in exprs).row(0, named=True).items()}


def statuses_to_labels(statuses: pl.DataFrame) -> pa.Table:
    """The labeled persons as a MEDS label table (subject_id, prediction_time, boolean_value)."""
    labeled = (
        statuses.filter(pl.col("status") == LABELED).select(LABEL_SCHEMA.names).sort("subject_id", "prediction_time")
    )
    return labeled.to_arrow().cast(LABEL_SCHEMA)


@dataclass
class LabelAccount:
    """Exact counts at two levels.

    Prediction times (label rows; a person without candidates counts one too_few_visits row):
    prediction_times == labeled + sum(excluded.values()).
    Persons: persons_in == persons_labeled + sum(persons_excluded.values()); a person with no
    labeled time is excluded for the reason of their earliest prediction time.
    """

    task: str
    persons_in: int = 0
    persons_labeled: int = 0
    persons_positive: int = 0
    persons_excluded: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EXCLUSION_REASONS, 0))
    prediction_times: int = 0
    labeled: int = 0
    positive: int = 0
    negative: int = 0
    censored_as_negative: int = 0
    excluded: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EXCLUSION_REASONS, 0))
    concept_sets: dict = field(default_factory=dict)
    concept_persons: dict[str, int] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)

    def add(self, statuses: pl.DataFrame, shard: str | None = None, concept_persons: dict | None = None) -> None:
        counts = dict(statuses.group_by("status").len().iter_rows())
        unknown = set(counts) - {LABELED, *EXCLUSION_REASONS}
        if unknown:
            raise ValueError(f"unknown label statuses {sorted(unknown)}")
        labeled = statuses.filter(pl.col("status") == LABELED)
        self.prediction_times += statuses.height
        self.labeled += labeled.height
        self.positive += int(labeled["boolean_value"].sum())
        self.negative += labeled.height - int(labeled["boolean_value"].sum())
        self.censored_as_negative += int(labeled["censored"].sum())
        for reason in EXCLUSION_REASONS:
            self.excluded[reason] += counts.get(reason, 0)
        people = statuses.group_by("subject_id").agg(
            (pl.col("status") == LABELED).any().alias("labeled"),
            pl.col("boolean_value").fill_null(False).any().alias("positive"),
            pl.col("status").sort_by(pl.col("prediction_time"), nulls_last=True).first().alias("first_status"),
        )
        self.persons_in += people.height
        self.persons_labeled += int(people["labeled"].sum())
        self.persons_positive += int(people["positive"].sum())
        reasons = dict(people.filter(~pl.col("labeled")).group_by("first_status").len().iter_rows())
        for reason in EXCLUSION_REASONS:
            self.persons_excluded[reason] += reasons.get(reason, 0)
        for key, n in (concept_persons or {}).items():
            self.concept_persons[key] = self.concept_persons.get(key, 0) + n
        if shard is not None:
            self.shards.append(shard)

    def check(self) -> None:
        if self.prediction_times != self.labeled + sum(self.excluded.values()):
            raise AssertionError(f"label account does not add up: {self.as_dict()}")
        if self.persons_in != self.persons_labeled + sum(self.persons_excluded.values()):
            raise AssertionError(f"label account (persons) does not add up: {self.as_dict()}")

    def as_dict(self) -> dict:
        return {
            "task": self.task,
            "persons_in": self.persons_in,
            "persons_labeled": self.persons_labeled,
            "persons_positive": self.persons_positive,
            "persons_excluded": dict(self.persons_excluded),
            "prediction_times": self.prediction_times,
            "labeled": self.labeled,
            "positive": self.positive,
            "negative": self.negative,
            "censored_as_negative": self.censored_as_negative,
            "excluded": dict(self.excluded),
            "concept_sets": dict(self.concept_sets),
            "concept_persons": dict(sorted(self.concept_persons.items())),
            "shards": list(self.shards),
        }


def concept_set_report(task: ResolvedTask) -> dict:
    """How the concept sets were expanded (path, codes per concept, source patterns): no data."""
    report = {"path": task.target.path, "expand_descendants": task.definition.expand_descendants}
    for role, criteria in (("target", task.target), ("prior", task.prior)):
        report[role] = {
            c.key: {"codes": len(c.codes), "source_codes": bool(c.source_pattern), "via": list(c.sources)}
            for c in criteria.concepts
        }
    return report


def new_account(task: ResolvedTask) -> LabelAccount:
    return LabelAccount(task=task.definition.name, concept_sets=concept_set_report(task))


def label_events(events: pa.Table | pl.DataFrame, task: ResolvedTask) -> tuple[pa.Table, LabelAccount]:
    """Labels and account for one in-memory event table (one or more whole subjects)."""
    statuses = label_statuses(events, task)
    account = new_account(task)
    account.add(statuses, concept_persons=concept_persons(events, task))
    account.check()
    return statuses_to_labels(statuses), account


def label_shard_file(path: str, task: ResolvedTask) -> tuple[pl.DataFrame, dict[str, int]]:
    """(statuses, persons per concept) for one MEDS shard file; the unit of work for a Ray map."""
    names = pq.read_schema(path).names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{Path(path).name}: events lack column(s) {missing}")
    columns = [*REQUIRED_COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in names)]
    table = pq.read_table(path, columns=columns)
    return label_statuses(table, task, source=Path(path).name), concept_persons(table, task, Path(path).name)


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
    people = [r[1] for r in results]
    results = [r[0] for r in results]
    account = new_account(task)
    seen = pl.concat([r.select("subject_id").with_columns(pl.lit(i).alias("shard")) for i, r in enumerate(results)])
    shared = seen.group_by("subject_id").agg(pl.col("shard").unique()).filter(pl.col("shard").list.len() > 1)
    if shared.height:
        shards = sorted({Path(paths[i]).name for row in shared["shard"].to_list() for i in row})
        raise ValueError(f"{shared.height} subjects appear in more than one shard ({', '.join(shards)})")
    for path, statuses, found in zip(paths, results, people):
        account.add(statuses, Path(path).name, concept_persons=found)
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
    """Shard files of a MEDS dataset (`data/<split>/*.parquet`), of a preprocessed directory in the
    old layout (`events/*.parquet`) or of a directory of shards."""
    root = Path(events_dir)
    base = next((root / sub for sub in (DATA_DIR, "events") if (root / sub).is_dir()), root)
    paths = sorted(str(p) for p in base.rglob("*.parquet") if not p.name.startswith("."))
    if not paths:
        raise FileNotFoundError(f"no event shards (*.parquet) in {events_dir}")
    return paths


def task_codebook(events_dir: Path, concept_table: pl.DataFrame | None) -> CodeBook | None:
    """The events' own codes (dataset metadata) first, else the OMOP concept table's, else None (id form)."""
    from ehrfm.tasks.concept_sets import codebook_of, dataset_codebook

    found = dataset_codebook(events_dir)
    return found if found is not None else codebook_of(concept_table)


def vocabulary(omop: Path | None) -> tuple[pl.DataFrame | None, pl.DataFrame | None]:
    """(concept_ancestor or None when absent or empty, concept table or None) from an OMOP dir."""
    from ehrfm.tasks.concept_sets import find_concept_ancestor, read_concept_ancestor, read_concept_table

    if omop is None:
        return None, None
    ancestry = read_concept_ancestor(omop) if find_concept_ancestor(omop) else None
    if ancestry is not None and ancestry.height == 0:
        ancestry = None
    return ancestry, read_concept_table(omop)


def public_account(summary: dict, limit: int | None = None) -> dict:
    """The console form of an account (as_dict without shards): person and prediction-time counts
    under the small-count rule. account.json keeps the exact counts beside labels.parquet, inside
    the workspace; what a person reads on a terminal or in a job log is published."""
    out = dict(summary)
    for total, excluded in (("persons_labeled", "persons_excluded"), ("labeled", "excluded")):
        shown = public_partition({total: summary[total], **summary[excluded]}, limit)
        out[total] = shown.pop(total)
        out[excluded] = shown
    for labeled, positive, negative in (
        ("persons_labeled", "persons_positive", None),
        ("labeled", "positive", "negative"),
    ):
        hide_positive = binary_hidden(summary[labeled], summary[positive], limit)[1]
        out[positive] = show(summary[positive], limit, hidden=True) if hide_positive else summary[positive]
        if negative is not None:
            hide_negative = hide_positive or is_small(summary[negative], limit)
            out[negative] = show(summary[negative], limit, hidden=True) if hide_negative else summary[negative]
    for key in ("persons_in", "prediction_times", "censored_as_negative"):
        out[key] = show(summary[key], limit) if is_small(summary[key], limit) else summary[key]
    if "concept_persons" in summary:
        out["concept_persons"] = {
            k: show(v, limit) if is_small(v, limit) else v for k, v in summary["concept_persons"].items()
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ehrfm label", description="label MEDS events for a prediction task")
    parser.add_argument(
        "--events", type=Path, required=True, help="MEDS dataset (data/<split>/) or a directory of event shards"
    )
    parser.add_argument("--task", required=True, help="shipped task name (t2d, cad, ...) or a task YAML")
    parser.add_argument("--out", type=Path, required=True, help="output directory for this task's labels")
    parser.add_argument("--omop", type=Path, default=None, help="OMOP dir with concept_ancestor (optional)")
    parser.add_argument("--ray", action="store_true", help="label shards as Ray tasks")
    parser.add_argument(
        "--aces-config",
        type=Path,
        default=None,
        metavar="YAML",
        help="also write the resolved task as an ACES task configuration (for MEDS tools); see docs/MEDS.md",
    )
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="task overrides (e.g. horizon_days=365)")
    args = parser.parse_args(argv)

    ancestry, concepts = vocabulary(args.omop)
    with usage_errors(parser):
        task = resolve_task(
            load_task(args.task, args.overrides), ancestry, concepts, task_codebook(args.events, concepts)
        )
    if task.definition.expand_descendants and ancestry is None:
        print(
            "concept_ancestor not available: descendants come from the shipped expansion "
            "(ehrfm/tasks/resources/concept_sets.csv) and source codes; see concept_sets in account.json",
            file=sys.stderr,
        )
    if args.aces_config is not None:
        args.aces_config.parent.mkdir(parents=True, exist_ok=True)
        args.aces_config.write_text(aces_yaml(task), encoding="utf-8")
        print(f"ACES task configuration written to {args.aces_config}", file=sys.stderr)
    _, account = label_shards(event_shards(args.events), task, args.out, use_ray=args.ray)
    summary = account.as_dict()
    summary.pop("shards")
    summary["concept_sets"] = summary["concept_sets"]["path"]  # the details are in account.json
    print(json.dumps(public_account(summary), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
