"""Calibration: reliability curve, expected calibration error, recalibration fit on validation data.

ECE = sum over bins of (bin share of persons) * |observed rate - mean predicted risk|. Bins are
equal-width on [0, 1] ("uniform") or equal-count ("quantile"); empty bins contribute nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

Strategy = Literal["uniform", "quantile"]
EPS = 1e-6


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


def reliability_curve(y_true, y_prob, n_bins: int = 10, strategy: Strategy = "uniform") -> ReliabilityCurve:
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


def expected_calibration_error(y_true, y_prob, n_bins: int = 10, strategy: Strategy = "uniform") -> float:
    return reliability_curve(y_true, y_prob, n_bins, strategy).ece


class Recalibrator:
    """Maps raw risks to recalibrated ones; fit on validation predictions, applied to test.

    "platt": logistic regression on the logit of the risk (two parameters, smooth).
    "isotonic": monotone step function (flexible; needs more validation data).
    """

    def __init__(self, method: Literal["platt", "isotonic"] = "platt"):
        if method not in ("platt", "isotonic"):
            raise ValueError(f"unknown recalibration method {method!r}")
        self.method = method
        self._model: LogisticRegression | IsotonicRegression | None = None

    def fit(self, y_true, y_prob) -> Recalibrator:
        y, p = _check(y_true, y_prob)
        if len(np.unique(y)) < 2:
            raise ValueError(f"recalibration needs both classes; got {int(y.sum())} positives of {y.size}")
        if self.method == "platt":
            self._model = LogisticRegression(C=1e6).fit(_logit(p)[:, None], y.astype(int))
        else:
            self._model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
        return self

    def transform(self, y_prob) -> np.ndarray:
        if self._model is None:
            raise RuntimeError("Recalibrator.transform called before fit")
        p = np.asarray(y_prob, dtype=np.float64).ravel()
        if self.method == "platt":
            return self._model.predict_proba(_logit(p)[:, None])[:, 1]
        return self._model.predict(p)


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, EPS, 1 - EPS)
    return np.log(q / (1 - q))
