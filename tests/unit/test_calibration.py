"""Recalibration never inverts a score, and the report and the reliability plot share one ECE binning."""

import numpy as np
import pytest

from ehrfm.calibration import PlattRefused, Recalibrator, fit_platt, logit, platt_or_none
from ehrfm.metrics import auroc


def _anti_correlated(n: int, seed: int):
    """A probability score that ranks the outcome backwards (AUROC well below 0.5)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    y = rng.random(n) < 1 / (1 + np.exp(-(1.5 * z - 2.0)))
    return y, 1 / (1 + np.exp(z))  # risk falls as the true liability rises


def test_platt_refuses_an_anti_correlated_score_instead_of_inverting_it():
    y, risk = _anti_correlated(4000, seed=1)
    val, test = slice(0, 2000), slice(2000, None)
    raw_auroc = auroc(y[test], risk[test])
    assert raw_auroc < 0.3
    with pytest.raises(PlattRefused, match=r"refused: score anti-correlated on validation \(Platt slope -"):
        fit_platt(logit(risk[val]), y[val])
    assert platt_or_none(logit(risk[val]), y[val]) is None

    recal = Recalibrator("platt").fit(y[val], risk[val])
    assert recal.refused is not None and "anti-correlated" in recal.refused
    out = recal.transform(risk[test])
    np.testing.assert_array_equal(out, risk[test])  # kept as it was, not flipped
    assert auroc(y[test], out) == pytest.approx(raw_auroc)  # an inverting map would give 1 - raw_auroc

    # the positively correlated score is still recalibrated (slope > 0)
    a, _ = fit_platt(logit(1 - risk[val]), y[val])
    assert a > 0 and Recalibrator("platt").fit(y[val], 1 - risk[val]).refused is None


def test_evaluation_lists_a_refused_recalibration_and_adds_no_recalibrated_row():
    from ehrfm.evaluate.baselines import recalibrated

    y, risk = _anti_correlated(3000, seed=2)
    split = np.where(np.arange(y.size) < 1500, "val", "test")
    good = np.clip(1 - risk, 0, 1)
    refused: dict[str, str] = {}
    out = recalibrated({"backwards": risk, "forwards": good}, y.astype(int), split, "platt", refused)
    assert list(out) == ["forwards (platt)"]
    assert list(refused) == ["backwards"] and refused["backwards"].startswith("recalibration refused")


def test_report_ece_and_plot_ece_are_the_same_number():
    from ehrfm.evaluate.calibration import ECE_BINS, reliability_curve
    from ehrfm.evaluate.plots import calibration_figure
    from ehrfm.evaluate.report import evaluate_predictions

    rng = np.random.default_rng(3)
    p = rng.beta(1, 12, size=3000)  # a rare outcome: risks crowd the lowest equal-width bin
    # under-predicted below 6%, over-predicted above: errors that cancel inside one wide bin
    y = rng.random(p.size) < np.where(p < 0.06, 2 * p, 0.4 * p)
    reported = evaluate_predictions("m", y, p, n_boot=10).ece
    legend = [t.get_text() for t in calibration_figure(y, {"m": p}).axes[0].get_legend().get_texts()]
    assert legend == [f"m (ECE {reported:.3f})"]
    curve = reliability_curve(y, p)
    assert curve.ece == reported and curve.count.size == ECE_BINS
    # the two binnings the report and the plot used to take differ here by more than rounding
    uniform = reliability_curve(y, p, strategy="uniform").ece
    assert abs(uniform - reported) > 0.01
