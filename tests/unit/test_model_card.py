"""The model card of a small run shows no person count from 1 to 20 (All of Us dissemination rule)."""

from __future__ import annotations

from ehrfm.mlops.model_card import subgroup_markdown
from tests.support.published_counts import markdown_count_cells, small_numbers
from tests.support.registry_models import card_for, make_workdir, risk_model


def test_card_of_a_small_run_shows_no_count_from_1_to_20(tmp_path) -> None:
    card = card_for(risk_model(make_workdir(tmp_path), "model", seed=0, task="t2d"))
    cells = markdown_count_cells(card)
    assert len(cells) >= 10 and small_numbers(cells) == []
    assert "| positives_rare_group | <=20 |" in card and "| persons_val | 300 |" in card
    # the 7-person "other" level: counts and metrics hidden, and another level's n and events with it
    assert "| sex | other | <=20 | <=20 | n/a | n/a | n/a |" in card
    assert "| sex | male | hidden | hidden |" in card  # else other = total - female - male
    assert [cells.count("<=20"), cells.count("hidden")] == [3, 2]


def test_subgroup_rows_read_back_as_published_strings_stay_suppressed() -> None:
    rows = [
        {"attribute": "sex", "level": "F", "n": 100, "events": 95},  # 5 non-events
        {"attribute": "sex", "level": "M", "n": 200, "events": 60},
        {"attribute": "sex", "level": "X", "n": "<=20", "events": "<=20"},
    ]
    table = subgroup_markdown(rows)
    # X's n alone would be 300 - 100 - 200: F's n (the smaller) goes with it; F's events (95, with 5
    # non-events) and X's are two hidden events cells already
    assert "| sex | F | hidden | hidden |" in table and "| sex | M | 200 | 60 |" in table
    assert "| sex | X | <=20 | <=20 |" in table
    assert small_numbers(markdown_count_cells(table)) == []
