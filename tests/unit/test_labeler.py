"""The task labeler on hand-made MEDS timelines: exclusions, horizon edges, censoring, the draw."""

from __future__ import annotations

import json

import meds
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ehrfm.tasks.concept_sets import expand_descendants, read_concept_ancestor
from ehrfm.tasks.definitions import SHIPPED_TASKS, TaskDefinition, load_task, resolve_task
from ehrfm.tasks.labeler import (
    EXCLUSION_REASONS,
    LABEL_SCHEMA,
    choose_prediction_times,
    label_events,
    label_shards,
    label_statuses,
    subject_uniform,
)
from tests.support.labeler_events import day, events, many_visit_events, t2d_task

T2D = "CONDITION/201826"
HORIZON = 730


def two_visits(subject: int, extra: list[tuple] = (), last_day: float = 1000.0) -> list[tuple]:
    """A person whose only candidate visit ends on day 10 (the prediction time); last visit later."""
    v = subject * 10
    return [
        (subject, None, "GENDER/8532"),
        (subject, -20000, "MEDS_BIRTH"),
        (subject, 5, "VISIT/9202", None, v),
        (subject, 10, "CONDITION/260139", None, v),  # acute bronchitis; visit ends on day 10
        (subject, last_day, "VISIT/9202", None, v + 1),
        *extra,
    ]


def status_of(table: pa.Table, task: TaskDefinition) -> dict[int, tuple]:
    frame = label_statuses(table, resolve_task(task))
    return {r["subject_id"]: (r["status"], r["boolean_value"]) for r in frame.iter_rows(named=True)}


def test_prior_evidence_excludes_by_domain_and_hba1c_threshold():
    table = events(
        two_visits(1, [(1, 3, T2D)])  # diagnosis before the prediction time
        + two_visits(2, [(2, 8, "DRUG/1503297")])  # metformin
        + two_visits(3, [(3, 9, "MEASUREMENT/3004410", 6.5)])  # HbA1c exactly at the threshold
        + two_visits(4, [(4, 9, "MEASUREMENT/3004410", 6.4)])  # below: stays in
        + two_visits(5, [(5, 10, T2D)])  # at the prediction time itself: history, excluded
        + two_visits(6, [(6, 9, "DRUG/1596977")])  # insulin
        + two_visits(7, [(7, 9, "MEASUREMENT/3004410", None)])  # HbA1c without a value: no evidence
    )
    got = status_of(table, t2d_task())
    assert got == {
        1: ("prior_condition", None),
        2: ("prior_drug", None),
        3: ("prior_measurement", None),
        4: ("labeled", False),
        5: ("prior_condition", None),
        6: ("prior_drug", None),
        7: ("labeled", False),
    }


def test_horizon_is_inclusive_by_default_and_one_day_after_is_negative():
    pt = 10
    table = events(
        two_visits(1, [(1, pt + HORIZON, T2D)])  # exactly prediction_time + 730 days
        + two_visits(2, [(2, pt + HORIZON + 1, T2D)])  # one day after the horizon
        + two_visits(3, [(3, pt + 1, T2D)])  # well inside
        + two_visits(4, [(4, pt + HORIZON - 1e-6, T2D)])  # a microsecond-ish before the end
    )
    inclusive = status_of(table, t2d_task())
    assert inclusive == {1: ("labeled", True), 2: ("labeled", False), 3: ("labeled", True), 4: ("labeled", True)}
    exclusive = status_of(table, t2d_task(horizon_inclusive=False))
    assert exclusive[1] == ("labeled", False) and exclusive[4] == ("labeled", True)
    shorter = status_of(table, t2d_task(horizon_days=365))
    assert shorter[1] == ("labeled", False) and shorter[3] == ("labeled", True)


def test_censoring_excludes_or_labels_negative_as_configured():
    pt = 10
    table = events(
        two_visits(1, last_day=pt + 400)  # record ends 400 days in, no outcome: lost
        + two_visits(2, [(2, pt + 300, meds.death_code)], last_day=pt + 200)  # died inside the window
        + two_visits(3, [(3, pt + 100, T2D)], last_day=pt + 200)  # outcome seen before the record ends
        + two_visits(4, last_day=pt + HORIZON)  # followed exactly to the window end: complete
    )
    task = t2d_task()
    assert status_of(table, task) == {
        1: ("lost_to_follow_up", None),
        2: ("died_before_horizon", None),
        3: ("labeled", True),
        4: ("labeled", False),
    }
    labels, account = label_events(table, resolve_task(t2d_task(censoring="negative")))
    assert dict(zip(labels["subject_id"].to_pylist(), labels["boolean_value"].to_pylist())) == {
        1: False,
        2: False,
        3: True,
        4: False,
    }
    assert account.censored_as_negative == 2 and account.labeled == 4 and sum(account.excluded.values()) == 0


def test_too_few_visits_and_exact_account():
    table = events(
        [(1, None, "GENDER/8532"), (1, 0, "VISIT/9202", None, 11)]  # one visit
        + [(2, None, "GENDER/8507")]  # static events only
        + [(3, 0, "VISIT/9202", None, 31), (3, 0, "VISIT/9202", None, 32)]  # two visits ending together
        + [(4, 0, T2D), (4, 5, "DRUG/1503297")]  # timed events but no visit ids
        + two_visits(5, [(5, 3, T2D)])
        + two_visits(6, [(6, 20, T2D)])
        + two_visits(7)
        + two_visits(8, last_day=100)
    )
    labels, account = label_events(table, resolve_task(t2d_task()))
    assert account.persons_in == 8
    assert account.excluded == {
        **dict.fromkeys(EXCLUSION_REASONS, 0),
        "too_few_visits": 4,
        "prior_condition": 1,
        "lost_to_follow_up": 1,
    }
    assert (account.labeled, account.positive, account.negative) == (2, 1, 1)
    assert account.persons_in == account.labeled + sum(account.excluded.values())
    assert labels.schema == LABEL_SCHEMA
    assert labels["prediction_time"].to_pylist() == [day(10), day(10)]
    meds.LabelSchema.validate(labels)  # the MEDS label schema accepts the table as written


def test_last_visit_is_never_chosen_and_every_other_visit_can_be():
    table = many_visit_events(40, np.random.default_rng(1))
    frame = pl.from_arrow(table)
    visit_ends = frame.group_by("subject_id", "visit_id").agg(pl.col("time").max().alias("end"))
    last_end = dict(visit_ends.group_by("subject_id").agg(pl.col("end").max()).iter_rows())
    chosen: dict[int, set] = {}
    for seed in range(60):
        times = choose_prediction_times(frame, seed)
        assert times.height == 40
        for subject, pt in times.iter_rows():
            assert pt < last_end[subject]
            chosen.setdefault(subject, set()).add(pt)
    ends = {s: set(visit_ends.filter(pl.col("subject_id") == s)["end"].to_list()) - {last_end[s]} for s in last_end}
    assert chosen == ends  # every non-last visit end is drawn for some seed, nothing else ever is


def test_draw_is_deterministic_by_seed_and_independent_of_row_order_and_sharding(tmp_path):
    table = many_visit_events(60, np.random.default_rng(2))
    task = resolve_task(t2d_task(seed=7))
    first, _ = label_events(table, task)
    shuffled = table.take(np.random.default_rng(3).permutation(table.num_rows))
    second, _ = label_events(shuffled, task)
    assert first.equals(second)
    subject = table["subject_id"].to_numpy()
    paths = []
    for i, keep in enumerate([subject <= 25, subject > 25]):
        paths.append(str(tmp_path / f"shard-{i}.parquet"))
        pq.write_table(table.filter(pa.array(keep)), paths[-1])
    sharded, account = label_shards(paths, task, out_dir=tmp_path / "labels")
    assert sharded.sort_by("subject_id").equals(first.sort_by("subject_id"))
    assert pq.read_table(tmp_path / "labels" / "labels.parquet").equals(sharded)
    assert account.shards == ["shard-0.parquet", "shard-1.parquet"]
    other, _ = label_events(table, resolve_task(t2d_task(seed=8)))
    assert not other["prediction_time"].equals(first["prediction_time"])
    draws = subject_uniform(np.arange(100_000), 0)
    assert draws.min() >= 0 and draws.max() < 1 and abs(draws.mean() - 0.5) < 0.01


def test_subject_in_two_shards_is_an_error_naming_the_shards(tmp_path):
    table = events(two_visits(1) + two_visits(2))
    pq.write_table(table, tmp_path / "a.parquet")
    pq.write_table(table.slice(0, 3), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"1 subjects appear in more than one shard \(a.parquet, b.parquet\)"):
        label_shards([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], resolve_task(t2d_task()))


def test_missing_event_column_is_a_clear_error(tmp_path):
    table = events(two_visits(1)).drop_columns(["visit_id"])
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet: events lack column\(s\) \['visit_id'\]"):
        label_shards([str(tmp_path / "bad.parquet")], resolve_task(t2d_task()))


def test_concept_ancestor_expands_target_and_prior_codes(tmp_path):
    omop = tmp_path / "omop"
    omop.mkdir()
    (omop / "CONCEPT_ANCESTOR.csv").write_text(
        "ANCESTOR_CONCEPT_ID\tDESCENDANT_CONCEPT_ID\tMIN_LEVELS_OF_SEPARATION\tMAX_LEVELS_OF_SEPARATION\n"
        "201826\t201826\t0\t0\n201826\t4193704\t1\t1\n1503297\t40163924\t2\t2\n"
    )
    ancestry = read_concept_ancestor(omop)
    assert expand_descendants([201826, 320128], ancestry) == [201826, 320128, 4193704]
    table = events(two_visits(1, [(1, 200, "CONDITION/4193704")]) + two_visits(2, [(2, 3, "DRUG/40163924")]))
    plain = status_of(table, t2d_task(expand_descendants="false"))
    assert plain == {1: ("labeled", False), 2: ("labeled", False)}
    # Without concept_ancestor the shipped expansion knows both (resources/concept_sets.csv).
    assert status_of(table, t2d_task()) == {1: ("labeled", True), 2: ("prior_drug", None)}
    expanded = label_statuses(table, resolve_task(t2d_task(), ancestry))
    assert expanded["status"].to_list() == ["labeled", "prior_drug"]
    assert expanded["boolean_value"].to_list() == [True, None]


@pytest.mark.parametrize("name", SHIPPED_TASKS)
def test_shipped_tasks_load_and_label(name):
    task = load_task(name)
    assert task.name == name and task.horizon_days == 730
    resolved = resolve_task(task)
    target_codes = resolved.target.codes["condition"]
    table = events(two_visits(1, [(1, 400, target_codes[0])]) + two_visits(2))
    assert status_of(table, task) == {1: ("labeled", True), 2: ("labeled", False)}


def test_label_command_writes_labels_and_account(tmp_path, capsys):
    from ehrfm.tasks.labeler import main

    events_dir = tmp_path / "events"
    events_dir.mkdir()
    pq.write_table(events(two_visits(1, [(1, 300, T2D)]) + two_visits(2, [(2, 1, T2D)])), events_dir / "0.parquet")
    pq.write_table(events([(3, None, "GENDER/8532")]), events_dir / "1.parquet")  # a shard without visits
    assert (
        main(
            [
                "--events",
                str(events_dir),
                "--task",
                "t2d",
                "--out",
                str(tmp_path / "out"),
                "--omop",
                str(tmp_path),
                "--aces-config",
                str(tmp_path / "aces" / "t2d.yaml"),
                "horizon_days=200",
            ]
        )
        == 0
    )
    assert "concept_ancestor not available" in capsys.readouterr().err
    aces = yaml.safe_load((tmp_path / "aces" / "t2d.yaml").read_text())  # the task as labelled: overrides applied
    assert aces["windows"]["target"]["end"] == "start + 200d" and aces["trigger"] == "visit_end"
    labels = pq.read_table(tmp_path / "out" / "labels.parquet")
    assert labels.to_pylist() == [{"subject_id": 1, "prediction_time": day(10), "boolean_value": False}]
    account = json.loads((tmp_path / "out" / "account.json").read_text())
    assert account["persons_in"] == 3 and account["labeled"] == 1
    assert {k: v for k, v in account["excluded"].items() if v} == {"prior_condition": 1, "too_few_visits": 1}
    assert account["shards"] == ["0.parquet", "1.parquet"]
