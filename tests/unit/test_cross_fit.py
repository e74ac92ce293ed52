"""Cross-fitted heads: person folds, out-of-fold scoring, and the paired comparison report."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier

from ehrfm.evaluate.cross_fit import cross_fit, cross_fit_markdown, cross_fit_report, person_folds
from ehrfm.evaluate.few_shot import FM_LR, Design, FewShotConfig, fm_design
from ehrfm.metrics import auroc


def test_person_folds_keep_a_persons_rows_together_and_are_balanced_and_reproducible():
    subjects = np.repeat(np.arange(103), np.random.default_rng(0).integers(1, 4, 103))
    fold = person_folds(subjects, 5, seed=3)
    for person in np.unique(subjects):
        assert len(set(fold[subjects == person])) == 1
    persons_per_fold = np.bincount([fold[subjects == p][0] for p in np.unique(subjects)])
    assert persons_per_fold.sum() == 103 and sorted(persons_per_fold.tolist()) == [20, 20, 21, 21, 21]
    np.testing.assert_array_equal(fold, person_folds(subjects, 5, seed=3))
    assert not np.array_equal(fold, person_folds(subjects, 5, seed=4))
    with pytest.raises(ValueError, match="at least 2 folds"):
        person_folds(subjects, 1, seed=0)


def test_every_row_is_scored_by_a_head_that_never_saw_its_person():
    # a per-person random id code that a tree can memorise: in-sample it separates the labels,
    # out of fold it carries nothing, since each person's rows sit in one fold
    rng = np.random.default_rng(1)
    subjects = np.repeat(np.arange(400), 2)
    y = np.repeat(rng.random(400) < 0.3, 2).astype(int)
    memorise = Design("hgb", np.repeat(rng.permutation(400), 2)[:, None].astype(float))
    config = FewShotConfig(shots=[], cross_fit_folds=4, threads=1)
    risks = cross_fit({"memorise": memorise}, y, person_folds(subjects, 4, 0), config)
    assert np.isfinite(risks["memorise"]).all()
    assert abs(auroc(y, risks["memorise"]) - 0.5) < 0.1
    in_sample = HistGradientBoostingClassifier(min_samples_leaf=1, max_iter=200).fit(memorise.x, y)
    assert auroc(y, in_sample.predict_proba(memorise.x)[:, 1]) > 0.9  # what leakage would have shown


def test_report_compares_the_fm_head_with_each_count_head_and_states_the_mdd():
    rng = np.random.default_rng(2)
    n = 1500
    x = rng.standard_normal((n, 4))
    y = ((x[:, 0] + 0.5 * rng.standard_normal(n)) > 1.3).astype(int)
    designs = {FM_LR: fm_design(x, None, None), "counts_lr": Design("lr", x[:, 1:])}  # counts miss feature 0
    config = FewShotConfig(shots=[], cross_fit_folds=5, threads=1)
    report = cross_fit_report(designs, y, np.arange(n), config, n_boot=200)
    assert report["models"][FM_LR]["auroc"] > 0.85 and report["models"]["counts_lr"]["auroc"] < 0.6
    diff = report["comparisons"][f"{FM_LR}-counts_lr"]
    assert diff["ci"][0] <= diff["auroc_difference"] <= diff["ci"][1] and diff["ci"][0] > 0.2
    assert 0 < diff["minimum_detectable_difference"] < 0.2
    assert report["judgeable"] == (y.sum() >= 300)
    text = cross_fit_markdown(report, "1500", str(y.sum()))
    assert "| fm_lr-counts_lr |" in text and "5 person folds" in text


def test_config_needs_two_folds_and_the_mean_for_several_windows():
    with pytest.raises(ValueError, match="at least 2"):
        FewShotConfig(cross_fit_folds=1)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        FewShotConfig(shots=[])
    with pytest.raises(ValueError, match="fm_inputs=last\\+mean"):
        FewShotConfig(history_windows=4)
    assert FewShotConfig(shots=[], cross_fit_folds=5, history_windows=4, fm_inputs="last+mean").cross_fit_folds == 5
