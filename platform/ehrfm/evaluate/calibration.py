"""Calibration: reliability curve and expected calibration error (recalibration maps: `ehrfm.calibration`).

ECE = sum over bins of (bin share of persons) * |observed rate - mean predicted risk|. Bins are
equal-width on [0, 1] ("uniform") or equal-count ("quantile"); empty bins contribute nothing.

One binning everywhere: the report's ECE, the subgroup tables and the reliability plot all take
ECE_BINS equal-count bins from `reliability_curve`'s defaults, so a number in the report and the
one in the plot's legend are the same number. Equal-count because the risks of a rare outcome sit
in the lowest one or two equal-width bins, where ECE would only see calibration-in-the-large.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Strategy = Literal["uniform", "quantile"]
EPS = 1e-6
ECE_BINS = 10
ECE_STRATEGY: Strategy = "quantile"


@dataclass(frozen=True)
class ReliabilityCurve:
    """Per non-empty bin: mean predicted risk, observed event rate and person count."""

    mean_predicted: np.ndarray
    observed: np.ndarray
    count: np.ndarray
    edges: np.ndarray

    @property
    def ece(self) -> float:
        total = self.count.sum()
        if total == 0:
            return float("nan")
        return float((self.count / total * np.abs(self.observed - self.mean_predicted)).sum())


def _check(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.float64).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.size}) and probabilities ({p.size}) differ in length")
    bad = int((~np.isfinite(p) | (p < 0) | (p > 1)).sum())
    if bad:
        raise ValueError(f"{bad} of {p.size} probabilities are outside [0, 1] or not finite")
    return y, p


def reliability_curve(y_true, y_prob, n_bins: int = ECE_BINS, strategy: Strategy = ECE_STRATEGY) -> ReliabilityCurve:
    y, p = _check(y_true, y_prob)
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    elif strategy == "quantile":
        inner = np.unique(np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1))[1:-1]) if p.size else np.array([])
        # identical scores leave one bin [0, 1], never an empty edge list
        edges = np.concatenate([[0.0], inner[(inner > 0.0) & (inner < 1.0)], [1.0]])
    else:
        raise ValueError(f"unknown binning strategy {strategy!r}")
    index = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(edges) - 2)
    count = np.bincount(index, minlength=len(edges) - 1).astype(np.float64)
    sum_p = np.bincount(index, weights=p, minlength=len(edges) - 1)
    sum_y = np.bincount(index, weights=y, minlength=len(edges) - 1)
    keep = count > 0
    return ReliabilityCurve(sum_p[keep] / count[keep], sum_y[keep] / count[keep], count[keep], edges)


def expected_calibration_error(y_true, y_prob, n_bins: int = ECE_BINS, strategy: Strategy = ECE_STRATEGY) -> float:
    return reliability_curve(y_true, y_prob, n_bins, strategy).ece
