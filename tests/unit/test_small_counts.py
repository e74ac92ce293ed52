"""The small-count rule: 1..threshold shown as `<=threshold`, 0 shown, complementary suppression."""

from __future__ import annotations

import pytest

from ehrfm import small_counts as sc


def test_counts_from_one_to_the_threshold_are_shown_as_the_label(monkeypatch) -> None:
    monkeypatch.delenv(sc.THRESHOLD_ENV, raising=False)
    assert [sc.show(v) for v in (0, 1, 20, 21, 72.0)] == ["0", "<=20", "<=20", "21", "72"]
    assert sc.show(float("nan")) == "n/a" and sc.show("<=20") == "<=20"
    assert sc.show(72, hidden=True) == "hidden" and sc.show(5, hidden=True) == "<=20"
    monkeypatch.setenv(sc.THRESHOLD_ENV, "10")
    assert [sc.show(v) for v in (10, 11)] == ["<=10", "11"]
    monkeypatch.setenv(sc.THRESHOLD_ENV, "ten")
    with pytest.raises(ValueError, match="EHRFM_SMALL_COUNT_THRESHOLD='ten'"):
        sc.threshold()


def test_events_are_hidden_when_the_non_events_are_small() -> None:
    assert sc.binary_hidden(72, 5) == (False, True)  # the model card's old "72 (5)"
    assert sc.binary_hidden(72, 60) == (False, True)  # 12 non-events = 72 - 60
    assert sc.binary_hidden(72, 30) == (False, False)
    assert sc.binary_hidden(72, 72) == (False, False)  # 0 non-events may be shown
    assert sc.binary_hidden(15, 0) == (True, False)


def test_one_hidden_cell_of_a_shown_total_takes_the_smallest_other_nonzero_cell() -> None:
    assert sc.complement([5, 0, 40, 30], [True, False, False, False]) == [True, False, False, True]
    assert sc.complement([5, 8, 40], [True, True, False]) == [True, True, False]  # two hidden: sum only
    assert sc.complement([5, 0], [True, False]) == [True, False]  # nothing else to hide (total is small)


def test_partition_hides_events_recoverable_from_the_column_totals() -> None:
    # sex F/M: F has 5 events; M's 50 shown would give F's as E - 50
    hide_n, hide_e = sc.partition_hidden([100, 200], [5, 50])
    assert hide_n == [False, False] and hide_e == [True, True]
    # non-events: group A has 95 of 100 events (5 non-events): its events hidden, then another's
    hide_n, hide_e = sc.partition_hidden([100, 200, 300], [95, 60, 90])
    assert hide_n == [False, False, False] and hide_e == [True, True, False]
    # a small group: n hidden, and another n with it (the total is shown)
    hide_n, hide_e = sc.partition_hidden([12, 200, 300], [0, 60, 90])
    assert hide_n == [True, True, False] and hide_e == [False, False, False]
    assert sc.partition_hidden([300, 400], [100, 150]) == ([False, False], [False, False])


def test_public_json_suppresses_person_counts_and_pairs_only() -> None:
    report = {
        "n_test": 72,
        "n_test_positive": 5,
        "n_boot": 10,
        "models": {"a": {"n": 72.0, "n_positive": 30.0, "auroc": 0.7}, "b": {"n": 300, "n_positive": 290}},
        "prs_use": {"n_genotyped": 12},
    }
    out = sc.public_json(report)
    assert out["n_test"] == 72 and out["n_test_positive"] == "<=20" and out["n_boot"] == 10
    assert out["models"]["a"] == {"n": 72.0, "n_positive": 30.0, "auroc": 0.7}
    assert out["models"]["b"] == {"n": 300, "n_positive": "hidden"}  # 10 non-events
    assert out["prs_use"] == {"n_genotyped": "<=20"}
    assert report["n_test_positive"] == 5  # the input is not changed


def test_public_partition_shows_small_cells_as_the_label_and_their_complement_hidden() -> None:
    shown = sc.public_partition({"labeled": 900, "prior": 7, "lost": 95, "none": 0}, limit=20)
    assert shown == {"labeled": 900, "prior": "<=20", "lost": "hidden", "none": 0}
    two_small = sc.public_partition({"labeled": 900, "prior": 7, "lost": 3}, limit=20)
    assert two_small == {"labeled": 900, "prior": "<=20", "lost": "<=20"}  # two hidden cells: no subtraction
