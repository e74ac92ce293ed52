"""Cross-fitted heads: person folds, out-of-fold scoring, and the paired comparison report."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier

from ehrfm.evaluate.calibration import expected_calibration_error
from ehrfm.evaluate.cross_fit import (
    ZERO_SHOT,
    cross_fit,
    cross_fit_markdown,
    cross_fit_report,
    person_folds,
    recalibrated_out_of_fold,
)
from ehrfm.evaluate.few_shot import (
    FM_ENS,
    FM_ENS_NO_PRS,
    FM_LR,
    FM_LR_NO_PRS,
    Design,
    Ensemble,
    FewShotConfig,
    fm_boosted_design,
    fm_design,
)
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


@pytest.mark.parametrize("prs_signal", [1.0, 0.0])
def test_prs_gains_of_the_fm_and_of_boosting_and_the_target_contrast(prs_signal):
    """The PRS adds to the label only through its own column: with signal both models gain and
    the report's contrast is FM gain - 0.6 x boosting's gain; without, neither gain is resolved."""
    rng = np.random.default_rng(6)
    n = 3000
    states = rng.standard_normal((n, 3))
    prs = rng.standard_normal((n, 1)).astype(np.float32)
    has_prs = rng.random(n) < 0.8
    liability = states[:, 0] + prs_signal * np.where(has_prs, prs[:, 0], 0.0) + 0.6 * rng.standard_normal(n)
    y = (liability > 1.5).astype(int)
    prs_cols = np.column_stack([np.where(has_prs[:, None], prs, 0.0), has_prs]).astype(np.float32)
    with_prs, without = fm_design(states, prs, has_prs), fm_design(states, None, None)
    designs = {
        FM_LR: with_prs,
        FM_LR_NO_PRS: without,
        FM_ENS: Ensemble((with_prs, fm_boosted_design(with_prs, None))),
        FM_ENS_NO_PRS: Ensemble((without, fm_boosted_design(without, None))),
        "counts_hgb": Design("hgb", states[:, :2]),
        "counts_prs_hgb": Design("hgb", np.column_stack([states[:, :2], prs_cols])),
    }
    config = FewShotConfig(shots=[], cross_fit_folds=4, threads=1, models=list(designs))
    report = cross_fit_report(designs, y, np.arange(n), config, n_boot=200)
    gains, targets = report["prs_gains"]["gains"], report["prs_gains"]["targets"]
    assert set(gains) == {"fm_lr", "fm_ens", "counts_hgb"} and set(targets) == {"fm_lr", "fm_ens"}
    auc = {name: m["auroc"] for name, m in report["models"].items()}
    assert gains["fm_lr"]["auroc_difference"] == pytest.approx(auc[FM_LR] - auc[FM_LR_NO_PRS])
    assert gains["fm_ens"]["auroc_difference"] == pytest.approx(auc[FM_ENS] - auc[FM_ENS_NO_PRS])
    ens_gain = gains["fm_ens"]["auroc_difference"]
    target = targets["fm_lr"]
    assert gains["counts_hgb"]["auroc_difference"] == pytest.approx(auc["counts_prs_hgb"] - auc["counts_hgb"])
    fm_gain, hgb_gain = gains["fm_lr"]["auroc_difference"], gains["counts_hgb"]["auroc_difference"]
    assert target["fm_gain_minus_share_of_hgb_gain"] == pytest.approx(fm_gain - 0.6 * hgb_gain)
    assert target["ci"][0] <= target["fm_gain_minus_share_of_hgb_gain"] <= target["ci"][1]
    assert targets["fm_ens"]["fm_gain_minus_share_of_hgb_gain"] == pytest.approx(ens_gain - 0.6 * hgb_gain)
    if prs_signal:
        assert gains["fm_ens"]["ci"][0] > 0.03
        assert gains["fm_lr"]["ci"][0] > 0.03 and gains["counts_hgb"]["ci"][0] > 0.03
        assert target["ci"][0] > 0 and target["ratio"] == pytest.approx(fm_gain / hgb_gain)
    else:
        assert gains["fm_lr"]["ci"][0] < 0 < gains["fm_lr"]["ci"][1] or abs(fm_gain) < 0.005
        assert abs(hgb_gain) < 0.02
    text = cross_fit_markdown(report, str(n), str(y.sum()))
    assert "| PRS gain (with - without the score) |" in text
    assert "fm_lr PRS gain - 0.6 x boosting's" in text and "fm_ens PRS gain - 0.6 x boosting's" in text


def test_config_needs_two_folds_and_the_mean_for_several_windows():
    with pytest.raises(ValueError, match="at least 2"):
        FewShotConfig(cross_fit_folds=1)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        FewShotConfig(shots=[])
    with pytest.raises(ValueError, match="fm_inputs=last\\+mean"):
        FewShotConfig(history_windows=4)
    assert FewShotConfig(shots=[], cross_fit_folds=5, history_windows=4, fm_inputs="last+mean").cross_fit_folds == 5


def _miscalibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from a known risk, and that risk distorted (too extreme, shifted up)."""
    rng = np.random.default_rng(seed)
    true_logit = -3.2 + 1.2 * rng.standard_normal(n)
    y = (rng.random(n) < 1 / (1 + np.exp(-true_logit))).astype(int)
    return y, 1 / (1 + np.exp(-(2.0 * true_logit + 3.0)))


def test_cross_fitted_platt_brings_a_miscalibrated_score_under_the_ece_target_from_other_folds_only():
    n = 20_000
    y, risk = _miscalibrated(n, seed=8)
    fold = person_folds(np.arange(n), 5, seed=0)
    recalibrated, refused = recalibrated_out_of_fold(risk, y, fold)
    assert refused == 0
    assert expected_calibration_error(y, risk) > 0.05 and expected_calibration_error(y, recalibrated) < 0.01
    # fold 0's map is fit on the other folds alone: its own labels cannot move its recalibrated risks
    flipped = y.copy()
    flipped[fold == 0] = 1 - flipped[fold == 0]
    again, _ = recalibrated_out_of_fold(risk, flipped, fold)
    np.testing.assert_array_equal(again[fold == 0], recalibrated[fold == 0])
    assert not np.allclose(again[fold == 1], recalibrated[fold == 1])
    # an anti-correlated score is never inverted: its folds keep the raw risks and are counted
    inverted, refused = recalibrated_out_of_fold(1 - risk, y, fold)
    assert refused == 5 and np.array_equal(inverted, 1 - risk)


def test_zero_shot_scores_join_the_cross_fit_and_its_gap_to_the_fm_head_is_judged():
    n = 6000
    rng = np.random.default_rng(9)
    y, risk = _miscalibrated(n, seed=9)
    x = np.column_stack([np.log(risk / (1 - risk)), rng.standard_normal((n, 2))])
    designs = {FM_LR: fm_design(x, None, None), "counts_lr": Design("lr", x[:, 1:])}
    config = FewShotConfig(shots=[], cross_fit_folds=5, threads=1)
    close = risk  # ranks as well as the head's inputs do, badly calibrated
    weak = 1 / (1 + np.exp(-(np.log(risk / (1 - risk)) + 3.0 * rng.standard_normal(n))))
    for score, met in ((close, True), (weak, False)):
        report = cross_fit_report(designs, y, np.arange(n), config, n_boot=200, fixed={ZERO_SHOT: score})
        gap = report["zero_shot"]
        assert report["judgeable"] and gap["head"] == FM_LR and gap["max_gap"] == 0.05
        assert gap["auroc_difference"] == pytest.approx(
            report["models"][FM_LR]["auroc"] - report["models"][ZERO_SHOT]["auroc"]
        )
        assert gap["met"] is met and (gap["ci"][1] <= 0.05) is met
        assert f"{ZERO_SHOT}-counts_lr" in report["comparisons"]
        zs = report["models"][ZERO_SHOT]
        assert zs["ece"] > 0.05 or not met  # the raw path probability is not a calibrated risk here
        text = cross_fit_markdown(report, str(n), str(y.sum()))
        assert f"fm_lr - zero_shot: {gap['auroc_difference']:+.3f}" in text
        assert ("): met." in text) is met
    assert report["models"][FM_LR]["ece_recalibrated"] <= 0.02 and report["models"][FM_LR]["ece_target_met"]
    assert "ECE <= 0.02 after recalibration: fm_lr" in text
    with pytest.raises(ValueError, match=f"zero_shot: needs a finite score for each of the {n} label rows"):
        cross_fit_report(designs, y, np.arange(n), config, n_boot=100, fixed={ZERO_SHOT: close[:-1]})
    with pytest.raises(ValueError, match="set cross_fit_folds >= 2"):
        FewShotConfig(zero_shot=["zs.parquet"])
