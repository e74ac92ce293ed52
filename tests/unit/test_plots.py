"""Evaluation figures readable at a glance: a colour per curve, legends outside, reliability axes
that span the predictions."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import to_hex

from ehrfm.evaluate.calibration import reliability_curve
from ehrfm.evaluate.plots import calibration_figure, pr_figure, roc_figure


@pytest.fixture(scope="module")
def rare_outcome():
    rng = np.random.default_rng(5)
    p = rng.beta(1, 40, size=2000)  # every risk well below 0.1 at the top bins' means
    y = rng.random(p.size) < p
    risks = {f"model_{i}": np.clip(p * (1 + 0.05 * i), 0, 1) for i in range(13)}  # the 13 curves
    return y, p, risks


def test_thirteen_curves_get_thirteen_colours_and_the_legend_sits_outside(rare_outcome) -> None:
    y, _, risks = rare_outcome
    for figure in (roc_figure(y, risks), pr_figure(y, risks), calibration_figure(y, risks)):
        ax = figure.axes[0]
        curves = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
        assert len(curves) == 13 and len({to_hex(c.get_color()) for c in curves}) == 13
        assert len({c.get_linestyle() for c in curves}) == 4
        anchor = ax.get_legend().get_bbox_to_anchor().transformed(ax.transAxes.inverted())
        assert anchor.x0 > 1.0  # right of the axes: no curve is covered


def test_reliability_axes_span_the_predictions_not_zero_to_one(rare_outcome) -> None:
    y, p, _ = rare_outcome
    ax = calibration_figure(y, {"m": p}).axes[0]
    curve = reliability_curve(y, p)
    top = 1.1 * max(np.nanmax(curve.mean_predicted), np.nanmax(curve.observed))
    assert top < 0.5
    assert ax.get_xlim() == pytest.approx((0, top)) and ax.get_ylim() == pytest.approx((0, top))
