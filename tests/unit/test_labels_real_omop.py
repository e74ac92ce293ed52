"""Issue #18 acceptance: labels on the real public OMOP samples agree with an independent computation.

The events come from the package (validation -> events, one shard), coded as the pipeline codes
them (`<vocabulary>/<concept_code>` from the sample's concept table, issue #20); the expected labels
are computed here again from the raw CSV tables with polars, on concept ids, from the concept
vocabulary shipped with each sample (names / concept_ancestor), not from the package's concept
lists or codes. Counts only: a code rename cannot change them.
"""

from __future__ import annotations

from datetime import timedelta

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from ehrfm.meds.codes import CodeBook
from ehrfm.omop.events import EVENT_SOURCES, death_events, finalize_shard, person_events, table_events
from ehrfm.omop.validation import PersonIndex, find_tables, validate_table
from ehrfm.tasks.concept_sets import read_concept_ancestor, read_concept_table
from ehrfm.tasks.definitions import TaskDefinition, load_task, resolve_task
from ehrfm.tasks.labeler import label_events

HORIZON = 730
EVERY_YEAR = ["prediction_times.strategy=landmarks", "prediction_times.min_gap_days=365"]
NO_CAP = ["prediction_times.max_per_person=100000"]  # no hashed draw: the expectation needs none


def omop_events(root) -> pa.Table:
    """All events of an OMOP directory as one finalized shard (validation and codes as the pipeline does)."""
    book = CodeBook.from_omop_dir(root)
    tables = find_tables(str(root))
    person = validate_table(tables["person"], "person", None).kept
    persons = PersonIndex.from_tables(person)
    parts = [person_events(person, book)[0]]
    if "death" in tables:
        death = validate_table(tables["death"], "death", persons).kept
        persons = PersonIndex.from_tables(person, death)
        if death.num_rows:
            parts.append(death_events(death)[0])
    for table in EVENT_SOURCES:
        if table in tables:
            kept = validate_table(tables[table], table, persons).kept
            if kept.num_rows:
                parts.append(table_events(table, kept, book)[0])
    return finalize_shard(pa.concat_tables(parts, promote_options="permissive"))


# ---- the independent computation ----------------------------------------------------------------
def raw(root, name: str) -> pl.DataFrame:
    path = next(p for p in root.iterdir() if p.name.lower() == f"{name}.csv")
    frame = pl.read_csv(path, infer_schema=False)
    return frame.rename({c: c.lower() for c in frame.columns})


def when(date_col: str, stamp_col: str | None) -> pl.Expr:
    day = pl.col(date_col).str.slice(0, 10).str.to_date().cast(pl.Datetime("us"))
    if stamp_col is None:
        return day
    stamp = pl.col(stamp_col).str.to_datetime(strict=False, time_unit="us")
    return pl.when(stamp.dt.date() == day.dt.date()).then(stamp).otherwise(day)


CLINICAL = {  # table -> (concept, date, datetime)
    "condition_occurrence": ("condition_concept_id", "condition_start_date", "condition_start_datetime"),
    "drug_exposure": ("drug_concept_id", "drug_exposure_start_date", "drug_exposure_start_datetime"),
    "procedure_occurrence": ("procedure_concept_id", "procedure_date", "procedure_datetime"),
    "measurement": ("measurement_concept_id", "measurement_date", "measurement_datetime"),
    "observation": ("observation_concept_id", "observation_date", "observation_datetime"),
}


def raw_rows(root) -> pl.DataFrame:
    """(person, time, table, concept, visit, value, unit) of every clinical row, plus visit starts/ends."""
    parts = []
    for table, (concept, date_col, stamp_col) in CLINICAL.items():
        frame = raw(root, table)
        if frame.height == 0:
            continue
        # The CDM's rules the validator enforces: a primary key once (first row kept).
        frame = frame.unique(subset=[f"{table}_id"], keep="first", maintain_order=True)
        value = pl.col("value_as_number") if "value_as_number" in frame.columns else pl.lit(None)
        unit = pl.col("unit_source_value") if "unit_source_value" in frame.columns else pl.lit(None)
        parts.append(
            frame.select(
                pl.col("person_id").cast(pl.Int64),
                when(date_col, stamp_col).alias("time"),
                pl.lit(table).alias("table"),
                pl.col(concept).cast(pl.Int64).alias("concept"),
                pl.col("visit_occurrence_id").cast(pl.Int64).alias("visit"),
                value.cast(pl.Float64).alias("value"),
                unit.cast(pl.String).alias("unit"),
            )
        )
    visits = raw(root, "visit_occurrence")
    start = when("visit_start_date", "visit_start_datetime")
    end = pl.max_horizontal(when("visit_end_date", "visit_end_datetime"), start)
    for name, expr in (("visit_start", start), ("visit_end", end)):
        parts.append(
            visits.select(
                pl.col("person_id").cast(pl.Int64),
                expr.alias("time"),
                pl.lit(name).alias("table"),
                pl.col("visit_concept_id").cast(pl.Int64).alias("concept"),
                pl.col("visit_occurrence_id").cast(pl.Int64).alias("visit"),
                pl.lit(None, pl.Float64).alias("value"),
                pl.lit(None, pl.String).alias("unit"),
            )
        )
    rows = pl.concat(parts).filter(pl.col("time").is_not_null())
    births = raw(root, "person").select(
        pl.col("person_id").cast(pl.Int64),
        pl.coalesce(
            pl.col("birth_datetime").str.slice(0, 10).str.to_date(strict=False),
            pl.date(
                pl.col("year_of_birth").cast(pl.Int32),
                pl.col("month_of_birth").cast(pl.Int32).fill_null(1),
                pl.col("day_of_birth").cast(pl.Int32).fill_null(1),
            ),
        ).alias("birth_day"),
    )
    # ... and no clinical row dated before the person's birth day.
    rows = rows.join(births, on="person_id", how="left")
    return rows.filter(pl.col("time").dt.date() >= pl.col("birth_day")).drop("birth_day")


def expected(root, target: pl.Expr, prior: pl.Expr) -> dict[str, int]:
    """Label counts by the issue's rules, from raw rows (yearly landmarks, no cap, censoring excluded)."""
    rows = raw_rows(root)
    inpatient = rows.filter(pl.col("table") == "visit_start").select(
        "visit", pl.col("concept").is_in([9201, 262, 8717]).alias("inpatient")
    )
    rows = rows.join(inpatient, on="visit", how="left").with_columns(pl.col("inpatient").fill_null(False))
    person = raw(root, "person").select(pl.col("person_id").cast(pl.Int64))
    births = raw(root, "person").select(
        pl.col("person_id").cast(pl.Int64),
        pl.coalesce(
            pl.col("birth_datetime").str.to_datetime(strict=False, time_unit="us"),
            pl.date(pl.col("year_of_birth").cast(pl.Int32), 1, 1).cast(pl.Datetime("us")),
        ).alias("birth"),
    )
    death = raw(root, "death").select(
        pl.col("person_id").cast(pl.Int64), when("death_date", "death_datetime").alias("death")
    )
    ends = (
        rows.filter(pl.col("visit").is_not_null()).group_by("person_id", "visit").agg(pl.col("time").max().alias("end"))
    )
    candidates = ends.filter(pl.col("end") < pl.col("end").max().over("person_id")).select("person_id", "end").unique()
    candidates = candidates.sort("person_id", "end")
    # Yearly landmarks: first candidate in each 365-day window from the person's first candidate.
    first = pl.col("end").min().over("person_id")
    landmarks = (
        candidates.with_columns(((pl.col("end") - first).dt.total_days() // 365).alias("w"))
        .group_by("person_id", "w")
        .agg(pl.col("end").min().alias("t"))
        .select("person_id", "t")
    )
    last = (
        pl.concat(
            [
                rows.select("person_id", "time"),
                births.select("person_id", pl.col("birth").alias("time")),
                death.select("person_id", pl.col("death").alias("time")),
            ]
        )
        .group_by("person_id")
        .agg(pl.col("time").max().alias("last"))
    )
    first_prior = rows.filter(prior).group_by("person_id").agg(pl.col("time").min().alias("first_prior"))
    target_times = rows.filter(target).select("person_id", pl.col("time").alias("tt"))
    hits = (
        landmarks.join(target_times, on="person_id")
        .filter((pl.col("tt") > pl.col("t")) & (pl.col("tt") <= pl.col("t") + timedelta(days=HORIZON)))
        .select("person_id", "t")
        .unique()
        .with_columns(pl.lit(True).alias("outcome"))
    )
    table = (
        landmarks.join(first_prior, on="person_id", how="left")
        .join(hits, on=["person_id", "t"], how="left")
        .join(last, on="person_id", how="left")
        .with_columns(pl.col("outcome").fill_null(False))
    )
    prior_hit = (pl.col("first_prior") <= pl.col("t")).fill_null(False)
    complete = pl.col("last") >= pl.col("t") + timedelta(days=HORIZON)
    labeled = table.filter(~prior_hit & (pl.col("outcome") | complete))
    return {
        "persons_in": person.height,
        "prediction_times": landmarks.height + person.join(landmarks, on="person_id", how="anti").height,
        "labeled": labeled.height,
        "positive": int(labeled["outcome"].sum()),
        "prior": int(table.filter(prior_hit).height),
        "persons_labeled": labeled["person_id"].n_unique(),
    }


def got(account) -> dict[str, int]:
    prior = sum(v for k, v in account.excluded.items() if k.startswith("prior_"))
    return {
        "persons_in": account.persons_in,
        "prediction_times": account.prediction_times,
        "labeled": account.labeled,
        "positive": account.positive,
        "prior": prior,
        "persons_labeled": account.persons_labeled,
    }


# ---- Synthea27Nj (CDM 5.4, concept_ancestor empty): T2D through the shipped expansion -----------
@pytest.fixture(scope="module")
def synthea(shared_data):
    root = shared_data / "synthea27nj_omop54" / "csv"
    return root, omop_events(root)


def test_synthea_t2d_labels_match_an_independent_computation(synthea):
    root, events = synthea
    concepts = raw(root, "concept")
    # Independently: T2D = the vocabulary's condition concepts named "type 2 diabetes mellitus";
    # diabetes drugs = drug concepts naming metformin / insulin (insulin not in inpatient visits).
    name = pl.col("concept_name").str.to_lowercase()
    t2d = concepts.filter((pl.col("domain_id") == "Condition") & name.str.contains("type 2 diabetes mellitus"))
    t2d_ids = t2d["concept_id"].cast(pl.Int64).to_list()
    metformin = concepts.filter((pl.col("domain_id") == "Drug") & name.str.contains("metformin"))
    insulin = concepts.filter((pl.col("domain_id") == "Drug") & name.str.contains("insulin"))
    is_t2d = (pl.col("table") == "condition_occurrence") & pl.col("concept").is_in(t2d_ids)
    is_drug = (pl.col("table") == "drug_exposure") & (
        pl.col("concept").is_in(metformin["concept_id"].cast(pl.Int64).to_list())
        | (pl.col("concept").is_in(insulin["concept_id"].cast(pl.Int64).to_list()) & ~pl.col("inpatient"))
    )
    is_hba1c = (
        (pl.col("table") == "measurement")
        & (pl.col("concept") == 3004410)
        & (pl.col("unit") == "%")
        & (pl.col("value") >= 6.5)
    )
    want = expected(root, is_t2d, is_t2d | is_drug | is_hba1c)

    task = resolve_task(load_task("t2d", EVERY_YEAR + NO_CAP), None, read_concept_table(root))
    assert task.target.path == "shipped"
    assert "SNOMED/44054006" in task.target.codes["condition"]  # T2D 201826 in the events' code form
    assert events.filter(pc.equal(events["code"], "SNOMED/44054006")).num_rows > 0
    _, account = label_events(events, task)
    assert got(account) == want
    assert want["prior"] > 0 and want["labeled"] > 0  # the sample exercises both
    t2d_persons = raw_rows(root).filter(is_t2d)["person_id"].n_unique()
    assert account.concept_persons["target:condition/201826"] == t2d_persons > 0
    # The seed-only path (no expansion) sees fewer T2D persons than the shipped expansion.
    plain = resolve_task(
        load_task("t2d", EVERY_YEAR + NO_CAP + ["expand_descendants=false"]), codebook=CodeBook.from_omop_dir(root)
    )
    _, seed_only = label_events(events, plain)
    assert seed_only.concept_persons["target:condition/201826"] <= account.concept_persons["target:condition/201826"]


# ---- GiBleed (CDM 5.3, with concept_ancestor): a GI-bleeding task with and without ancestry ----
GI_BLEED = 192671  # Gastrointestinal hemorrhage (SNOMED 74474003)


@pytest.fixture(scope="module")
def gibleed(shared_data):
    root = shared_data / "gibleed_omop53"
    return root, omop_events(root)


@pytest.mark.parametrize("with_ancestor", [True, False])
def test_gibleed_labels_match_an_independent_computation(gibleed, with_ancestor):
    root, events = gibleed
    ancestors = raw(root, "concept_ancestor")
    ids = [GI_BLEED]
    if with_ancestor:
        ids += (
            ancestors.filter(pl.col("ancestor_concept_id") == str(GI_BLEED))["descendant_concept_id"]
            .cast(pl.Int64)
            .to_list()
        )
    is_bleed = (pl.col("table") == "condition_occurrence") & pl.col("concept").is_in(ids)
    want = expected(root, is_bleed, is_bleed)

    definition = TaskDefinition.model_validate(
        {
            "name": "gi_bleed",
            "target": {"condition": [GI_BLEED]},
            "prediction_times": {"strategy": "landmarks", "min_gap_days": 365, "max_per_person": 100000},
        }
    )
    ancestry = read_concept_ancestor(root) if with_ancestor else None
    task = resolve_task(definition, ancestry, codebook=CodeBook.from_omop_dir(root))
    assert "SNOMED/74474003" in task.target.codes["condition"]  # the events' code form
    assert task.target.path == ("concept_ancestor" if with_ancestor else "shipped")
    _, account = label_events(events, task)
    assert got(account) == want
    assert want["positive"] > 0


def test_label_command_on_an_export_with_an_empty_concept_ancestor_says_which_path(synthea, tmp_path, capsys):
    import json

    import pyarrow.parquet as pq

    from ehrfm.tasks.labeler import main

    root, events = synthea
    (tmp_path / "events").mkdir()
    pq.write_table(events, tmp_path / "events" / "0.parquet")
    assert (
        main(["--events", str(tmp_path / "events"), "--task", "t2d", "--out", str(tmp_path / "L"), "--omop", str(root)])
        == 0
    )
    printed = capsys.readouterr()
    assert "concept_ancestor not available" in printed.err
    account = json.loads((tmp_path / "L" / "account.json").read_text())
    assert account["concept_sets"]["path"] == "shipped"
    assert account["concept_sets"]["target"]["condition/201826"]["source_codes"] is True
    assert account["persons_in"] == account["persons_labeled"] + sum(account["persons_excluded"].values())
    assert account["prediction_times"] == account["labeled"] + sum(account["excluded"].values())
    # Humulin 70/30 (19009384) is named "insulin": matched through the concept table's names too.
    assert account["concept_persons"]["prior:drug/1596977 outside inpatient"] == 1
    # the terminal gets the published form: 28 persons, so most counts are small (1-20 never shown)
    console = json.loads(printed.out)

    def counts(value):
        if isinstance(value, dict):
            for v in value.values():
                yield from counts(v)
        elif isinstance(value, int) and not isinstance(value, bool):
            yield value

    assert not [c for c in counts(console) if 0 < c <= 20]
    assert console["persons_in"] == account["persons_in"] > 20
    assert console["concept_persons"]["prior:drug/1596977 outside inpatient"] == "<=20"
    # persons_in = labeled + excluded: with one small exclusion cell shown as <=20, the labeled
    # persons would be 28 minus the rest, so they are hidden too (complementary suppression)
    small_exclusions = [k for k, v in account["persons_excluded"].items() if 0 < v <= 20]
    assert len(small_exclusions) == 1 and console["persons_excluded"][small_exclusions[0]] == "<=20"
    assert console["persons_labeled"] == "hidden"
