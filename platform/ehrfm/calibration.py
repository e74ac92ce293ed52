"""Recalibration maps, fit on validation rows and applied elsewhere: the one place a Platt map is fit.

Fine-tuning stores the Platt map of a risk model (`HeadSpec.platt`) and evaluation recalibrates any
model's risks with the same fit, so the two cannot disagree about what "Platt scaling" means.

A Platt map only ever has a positive slope. When a score is anti-correlated with the outcome on the
validation rows the fitted slope is negative, and applying it would silently turn the score upside
down (a zero-shot AUROC of 0.36 reported as 0.64 "after calibration"). That fit is refused
(`PlattRefused`): the score stays as it was and the refusal is reported, never inverted.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

EPS = 1e-6


def logit(p) -> np.ndarray:
    """log(p / (1 - p)) with p clipped away from 0 and 1."""
    q = np.clip(np.asarray(p, dtype=np.float64).ravel(), EPS, 1 - EPS)
    return np.log(q / (1 - q))


class PlattRefused(ValueError):
    """The validation rows give a Platt slope <= 0: the score is anti-correlated (or unrelated)."""


def fit_platt(logits, labels) -> tuple[float, float]:
    """(a, b) of sigmoid(a * logit + b): logistic regression on the logit. The mild L2 on `a` (C=1)
    is negligible next to hundreds of validation log-losses, but keeps `a` finite when the
    validation set is perfectly separated (where the unpenalised fit diverges). Raises PlattRefused
    when a <= 0 (the map would invert or flatten the score)."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(labels).astype(int).ravel()
    if len(np.unique(y)) < 2:
        raise ValueError(f"Platt scaling needs both classes; got {int(y.sum())} positives of {y.size}")
    fit = LogisticRegression(C=1.0, max_iter=1000).fit(np.asarray(logits, np.float64).reshape(-1, 1), y)
    a, b = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    if not a > 0:
        raise PlattRefused(
            f"recalibration refused: score anti-correlated on validation (Platt slope {a:.3g} <= 0, "
            f"{int(y.sum())} positives of {y.size}); the score is kept uncalibrated"
        )
    return a, b


def platt_or_none(logits, labels) -> tuple[float, float] | None:
    """`fit_platt`, or None when it is refused (a risk model then stays uncalibrated)."""
    try:
        return fit_platt(logits, labels)
    except PlattRefused:
        return None


def apply_platt(platt: tuple[float, float], logits) -> np.ndarray:
    """sigmoid(a * logit + b)."""
    from scipy.special import expit

    a, b = platt
    return expit(a * np.asarray(logits, np.float64) + b)


class Recalibrator:
    """Maps raw risks to recalibrated ones; fit on validation predictions, applied to test.

    "platt": `fit_platt` on the logit of the risk (two parameters, smooth). When the fit is refused
    (score anti-correlated on validation) `refused` holds the reason and `transform` returns the
    risks unchanged: callers report the refusal rather than a recalibrated score.
    "isotonic": monotone step function (flexible; needs more validation data).
    """

    def __init__(self, method: Literal["platt", "isotonic"] = "platt"):
        if method not in ("platt", "isotonic"):
            raise ValueError(f"unknown recalibration method {method!r}")
        self.method = method
        self._platt: tuple[float, float] | None = None
        self._isotonic = None
        self.refused: str | None = None

    def fit(self, y_true, y_prob) -> Recalibrator:
        y = np.asarray(y_true).astype(np.float64).ravel()
        p = np.asarray(y_prob, dtype=np.float64).ravel()
        if y.shape != p.shape:
            raise ValueError(f"y_true has {y.size} values but y_prob has {p.size}")
        if len(np.unique(y)) < 2:
            raise ValueError(f"recalibration needs both classes; got {int(y.sum())} positives of {y.size}")
        self.refused = None
        if self.method == "platt":
            try:
                self._platt = fit_platt(logit(p), y)
            except PlattRefused as refusal:
                self._platt, self.refused = None, str(refusal)
        else:
            from sklearn.isotonic import IsotonicRegression

            self._isotonic = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
        return self

    def transform(self, y_prob) -> np.ndarray:
        p = np.asarray(y_prob, dtype=np.float64).ravel()
        if self.refused is not None:
            return p.copy()
        if self._platt is None and self._isotonic is None:
            raise RuntimeError("Recalibrator.transform called before fit")
        if self._platt is not None:
            return apply_platt(self._platt, logit(p))
        return self._isotonic.predict(p)
