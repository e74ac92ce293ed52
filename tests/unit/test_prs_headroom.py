"""`ehrfm prs_headroom` on the evaluation tests' hand-made task: the trait's score adds, others do not."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ehrfm.cli import run_command
from ehrfm.evaluate.baselines import BaselineConfig
from ehrfm.evaluate.oracle import oracle_scores
from ehrfm.evaluate.prs_headroom import prs_headroom
from ehrfm.evaluate.truth import load_truth
from ehrfm.transfer.examples import read_labels
from tests.support.evaluate_factory import make_task

FAST = BaselineConfig(hgb_max_iter=40, threads=1, min_persons_per_code=3)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_task(tmp_path_factory.mktemp("headroom"), seed=2)


def test_the_traits_score_adds_and_an_unrelated_one_does_not(task):
    # the fixture's outcome uses 1.5 x PGS000002 (the truth's T2D score) on the genotyped; PGS000003 is noise
    trait = prs_headroom(task["data"], task["labels"], task["cohort"], config=FAST)
    noise = prs_headroom(task["data"], task["labels"], task["cohort"], pgs_id="PGS000003", config=FAST)
    assert trait["pgs_id"] == "PGS000002" and noise["pgs_id"] == "PGS000003"
    assert trait["rows"] == len(task["y"]) and trait["events"] == int(task["y"].sum())
    assert trait["hgb_counts"]["gain"] > 0.05 and trait["oracle_plus_score"]["gain"] > 0.02
    assert trait["hgb_counts"]["gain"] > noise["hgb_counts"]["gain"] + 0.05
    assert trait["hgb_counts"]["without"] == pytest.approx(noise["hgb_counts"]["without"])  # same folds, same counts
    assert len(trait["hgb_counts"]["gain_per_seed"]) == 2


def test_oracle_rows_match_a_direct_computation(task):
    result = prs_headroom(task["data"], task["labels"], task["cohort"], config=FAST, seeds=(0,))
    labels = read_labels(task["labels"])
    oracle = oracle_scores(load_truth(task["cohort"]), labels, 730)
    expected = {k: roc_auc_score(task["y"], v) for k, v in oracle.risks.items()}
    assert result["oracle"]["genetic"] == pytest.approx(expected["oracle_genetic"], abs=1e-12)
    assert result["oracle"]["headroom"] == pytest.approx(expected["oracle_genetic"] - expected["oracle_group_mean"])
    assert result["oracle"]["rows_already_begun"] == int(oracle.already_begun.sum())


def test_cli_writes_json_and_a_table_without_a_cohort(task, tmp_path, capsys):
    out = tmp_path / "headroom.json"
    assert (
        run_command(
            "prs_headroom",
            [
                "--data",
                str(task["data"]),
                "--labels",
                str(task["labels"]),
                "--seeds",
                "0",
                "--out",
                str(out),
                "hgb_max_iter=40",
                "threads=1",
                "min_persons_per_code=3",
            ],
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert "oracle" not in result and result["pgs_id"] is None  # no cohort: column 0 of the PRS, no oracle rows
    assert np.isfinite(result["hgb_counts"]["gain"])
    assert "| gradient boosting on counts + the observed score (5-fold CV, 1 seeds) |" in capsys.readouterr().out
