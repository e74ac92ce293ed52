"""Metrics against scikit-learn, bootstrap CIs, calibration, stratified tables and the report (logging to
MLflow: tests/integration/test_metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from ehrfm.calibration import Recalibrator
from ehrfm.evaluate.calibration import expected_calibration_error, reliability_curve
from ehrfm.evaluate.stratify import age_bucket, prs_deciles, risk_by_prs_decile, subgroup_table, wilson_interval
from ehrfm.metrics import (
    auprc,
    auroc,
    auroc_ci,
    bootstrap_contrast,
    bootstrap_difference,
    bootstrap_metric,
    bootstrap_weights,
)


def scored_sample(n: int, seed: int, ties: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.25
    s = rng.normal(size=n) + 0.8 * y
    return y, (np.round(s, 1) if ties else s)


@pytest.mark.parametrize("n,seed,ties", [(7, 0, True), (50, 1, True), (2000, 2, True), (2000, 3, False)])
def test_auroc_and_auprc_match_scikit_learn(n, seed, ties):
    y, s = scored_sample(n, seed, ties)
    y[0], y[1] = True, False  # both classes present even at n=7
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auprc(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_single_class_gives_nan_not_an_error():
    assert np.isnan(auroc([1, 1, 1], [0.2, 0.4, 0.3]))
    assert np.isnan(auprc([0, 0], [0.2, 0.4]))
    est = auroc_ci([0, 0, 0], [0.1, 0.2, 0.3], n_boot=50)
    assert np.isnan(est.value) and est.n_boot_valid == 0
    with pytest.raises(ValueError, match="1 of 3 scores are NaN"):
        auroc([0, 1, 0], [0.1, np.nan, 0.2])


@pytest.mark.parametrize("metric,reference", [("auroc", roc_auc_score), ("auprc", average_precision_score)])
def test_every_bootstrap_resample_matches_weighted_scikit_learn(metric, reference):
    y, s = scored_sample(300, 4)
    n_boot, seed = 100, 11
    est = bootstrap_metric(metric, y, s, n_boot=n_boot, seed=seed)
    weights = bootstrap_weights(y.size, n_boot, np.random.default_rng(seed))
    expected = np.array([reference(y, s, sample_weight=w) for w in weights])
    lower, upper = np.quantile(expected, [0.025, 0.975])
    assert (est.lower, est.upper) == pytest.approx((lower, upper), abs=1e-12)
    assert est.n_boot_valid == n_boot


def test_bootstrap_ci_contains_estimate_shrinks_with_n_and_is_seeded():
    widths = []
    for n in (200, 5000):
        y, s = scored_sample(n, 5)
        for metric in ("auroc", "auprc"):
            est = bootstrap_metric(metric, y, s, n_boot=1000, seed=0)
            assert est.lower <= est.value <= est.upper
            widths.append(est.upper - est.lower)
    assert widths[2] < widths[0] / 3 and widths[3] < widths[1] / 3  # ~ 1/sqrt(25) = 1/5
    y, s = scored_sample(400, 6)
    assert bootstrap_metric("auroc", y, s, seed=1) == bootstrap_metric("auroc", y, s, seed=1)
    assert bootstrap_metric("auroc", y, s, seed=1).lower != bootstrap_metric("auroc", y, s, seed=2).lower
    chunked = bootstrap_metric("auroc", y, s, seed=1, chunk_elems=1000)  # chunks of 2 resamples
    assert chunked == bootstrap_metric("auroc", y, s, seed=1)


def test_person_resampling_keeps_a_persons_rows_together():
    """With several rows per person, resampling rows treats copies as independent evidence and
    narrows the interval; resampling persons (groups=subject ids) does not."""
    rng = np.random.default_rng(3)
    n = 400
    y = rng.random(n) < 0.2
    s = y * 0.8 + rng.normal(size=n)
    copies = 6
    y_rep, s_rep = np.repeat(y, copies), np.repeat(s, copies)
    persons = np.repeat(np.arange(n) * 7 + 11, copies)  # ids need not be 0..n-1 nor sorted by row

    def width(est):
        return est.upper - est.lower

    one_row_each = auroc_ci(y, s, 1000, seed=1)
    rows = auroc_ci(y_rep, s_rep, 1000, seed=1)
    by_person = auroc_ci(y_rep, s_rep, 1000, seed=1, groups=persons)
    assert rows.value == pytest.approx(one_row_each.value) == pytest.approx(by_person.value)
    assert width(rows) < 0.55 * width(one_row_each)  # ~1/sqrt(6) of it: overconfident
    assert width(by_person) == pytest.approx(width(one_row_each), rel=0.2)
    # one row per person: the person resample is the row resample, draw for draw
    assert auroc_ci(y, s, 500, seed=2, groups=np.arange(n)) == auroc_ci(y, s, 500, seed=2)
    diff = bootstrap_difference("auroc", y_rep, s_rep, s_rep + rng.normal(size=y_rep.size), 500, 1, groups=persons)
    assert diff.lower < diff.value < diff.upper
    with pytest.raises(ValueError, match="groups has 5 entries for 2400 rows"):
        auroc_ci(y_rep, s_rep, 10, groups=np.arange(5))


def test_a_contrast_of_several_models_is_scored_on_shared_resamples():
    """(a - b) - 0.6 (c - d): the point is that combination of the four AUROCs; with weights (1, -1)
    it is the paired difference draw for draw; and the interval is narrower than the four
    separate intervals would allow, since the four are scored on the same persons."""
    rng = np.random.default_rng(4)
    n = 600
    y = rng.random(n) < 0.2
    persons = np.repeat(np.arange(n // 2), 2)
    base = y * 1.0 + rng.normal(size=n)
    a, b, c, d = (base + rng.normal(0, s, n) for s in (0.2, 0.6, 0.3, 0.5))
    weights = [1.0, -1.0, -0.6, 0.6]
    est = bootstrap_contrast("auroc", y, [a, b, c, d], weights, 400, seed=3, groups=persons)
    points = [auroc(y, s) for s in (a, b, c, d)]
    assert est.value == pytest.approx(sum(w * p for w, p in zip(weights, points)), abs=1e-12)
    assert est.lower < est.value < est.upper and est.n_boot_valid == 400
    separate = [bootstrap_metric("auroc", y, s, 400, seed=3, groups=persons) for s in (a, b, c, d)]
    loose = sum(abs(w) * (e.upper - e.lower) for w, e in zip(weights, separate))
    assert est.upper - est.lower < 0.5 * loose
    assert bootstrap_contrast("auroc", y, [a, b], [1.0, -1.0], 300, seed=5) == bootstrap_difference(
        "auroc", y, a, b, 300, seed=5
    )
    with pytest.raises(ValueError, match="one weight per vector"):
        bootstrap_contrast("auroc", y, [a, b], [1.0], 10)


def test_ece_near_zero_when_calibrated_and_near_known_gap_when_not():
    rng = np.random.default_rng(7)
    p = rng.random(200_000)
    y = rng.random(p.size) < p
    assert expected_calibration_error(y, p) < 0.005
    assert expected_calibration_error(y, p, strategy="uniform") < 0.005
    # Predicting half the true risk: every bin is off by mean(p)/2 on average -> ECE = E[p]/2 = 0.25.
    assert expected_calibration_error(y, p / 2) == pytest.approx(0.25, abs=0.005)
    curve = reliability_curve(y, p / 2, n_bins=10, strategy="uniform")
    assert curve.count.sum() == p.size and curve.count.size == 5  # p/2 < 0.5 fills the lower 5 bins
    with pytest.raises(ValueError, match="1 of 3 probabilities are outside"):
        expected_calibration_error([0, 1, 1], [0.1, 1.2, 0.3])


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_recalibration_fit_on_validation_fixes_test_calibration(method):
    rng = np.random.default_rng(8)
    logit = rng.normal(size=40_000)
    y = rng.random(logit.size) < 1 / (1 + np.exp(-logit))
    overconfident = 1 / (1 + np.exp(-3 * logit + 1))
    val, test = slice(0, 20_000), slice(20_000, None)
    before = expected_calibration_error(y[test], overconfident[test])
    recal = Recalibrator(method).fit(y[val], overconfident[val])
    after = expected_calibration_error(y[test], recal.transform(overconfident[test]))
    assert before > 0.08 and after < 0.02
    assert auroc(y[test], recal.transform(overconfident[test])) == pytest.approx(
        auroc(y[test], overconfident[test]), abs=0.01
    )  # monotone: ranking kept


def test_prs_deciles_and_observed_risk_rise_with_prs():
    rng = np.random.default_rng(9)
    prs = rng.normal(size=10_000)
    prs[:500] = np.nan  # not genotyped
    risk = 1 / (1 + np.exp(-(np.nan_to_num(prs) * 1.2 - 2)))
    y = rng.random(prs.size) < risk
    groups = prs_deciles(prs)
    assert (groups[:500] == 0).all() and np.bincount(groups[500:]).tolist() == [0] + [950] * 10
    table = risk_by_prs_decile(y, prs, risk)
    assert table["group"].to_list() == [f"D{i}" for i in range(1, 11)] + ["no PRS"]
    assert table["n"].sum() == 10_000 and table["events"].sum() == int(y.sum())
    rates = table["observed_rate"].to_numpy()[:10]
    assert rates[9] > 5 * rates[0] and np.all(np.diff(rates) > -0.03)
    assert np.all(table["ci_low"].to_numpy() <= rates.tolist() + [table["observed_rate"][10]])
    low, high = wilson_interval(np.array([0, 5]), np.array([10, 10]))
    assert low[0] == pytest.approx(0.0, abs=1e-12) and high[0] == pytest.approx(0.2775, abs=1e-4)
    assert (low[1], high[1]) == pytest.approx((0.2366, 0.7634), abs=1e-4)


def test_age_buckets_and_subgroup_table():
    assert age_bucket([12, 40, 49.9, 55, 69, 70, 90, np.nan]).tolist() == [
        "<40",
        "40-49",
        "40-49",
        "50-59",
        "60-69",
        "70+",
        "70+",
        "unknown",
    ]
    rng = np.random.default_rng(10)
    n = 3000
    sex = rng.choice(["female", "male"], size=n)
    ancestry = rng.choice(["AFR", "EUR", "EAS"], p=[0.3, 0.695, 0.005], size=n)
    y, s = scored_sample(n, 11, ties=False)
    p = 1 / (1 + np.exp(-s))
    table = subgroup_table(y, p, {"sex": sex, "ancestry": ancestry}, n_boot=100, min_count=20)
    assert table.select("attribute", "level").rows() == [
        ("sex", "female"),
        ("sex", "male"),
        ("ancestry", "AFR"),
        ("ancestry", "EAS"),
        ("ancestry", "EUR"),
    ]
    female = table.row(0, named=True)
    mask = sex == "female"
    assert female["n"] == mask.sum() and female["events"] == y[mask].sum()
    assert female["auroc"] == pytest.approx(roc_auc_score(y[mask], p[mask]))
    assert female["auroc_low"] < female["auroc"] < female["auroc_high"]
    eas = table.row(3, named=True)
    assert eas["n"] < 20 and np.isnan(eas["auroc"])  # too small to estimate: counts only


def test_quantile_reliability_with_identical_scores_is_one_bin():
    from ehrfm.evaluate.calibration import reliability_curve

    curve = reliability_curve([0, 1, 0, 0], [0.2] * 4, strategy="quantile")
    assert curve.count.tolist() == [4.0] and curve.observed.tolist() == [0.25]
    assert curve.ece == pytest.approx(0.05)
