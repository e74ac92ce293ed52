"""AUROC and AUPRC with seeded bootstrap confidence intervals, computed for all resamples at once.

A bootstrap resample is a vector of multiplicities (how often each person was drawn), so both
metrics are written as weighted sums over the scores sorted once: tied scores form one threshold
group, exactly as scikit-learn's roc_auc_score and average_precision_score treat ties. The
resamples are processed in chunks so memory stays at about `chunk_elems` floats.

Rows are the resampled unit unless `groups` is given: with several label rows per person (one per
prediction time), pass the subject ids, so a resample draws persons and takes all of each drawn
person's rows. Rows of one person are correlated; resampling them one by one makes intervals too
narrow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_BOOTSTRAP = 1000


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a percentile bootstrap interval (NaN when undefined)."""

    value: float
    lower: float
    upper: float
    n_boot: int = 0
    n_boot_valid: int = 0  # resamples with both classes present
    se: float = float("nan")  # standard deviation of the valid resamples (the bootstrap standard error)

    def minimum_detectable(self, alpha: float = 0.05, power: float = 0.8) -> float:
        """The smallest true difference this sample would detect (two-sided `alpha`, `power`) given
        the bootstrap standard error: (z_{1-alpha/2} + z_{power}) * se (0.05, 0.8: 2.80 * se)."""
        from statistics import NormalDist

        z = NormalDist().inv_cdf
        return float((z(1 - alpha / 2) + z(power)) * self.se)

    def fmt(self, digits: int = 3) -> str:
        if np.isnan(self.value):
            return "n/a"
        if np.isnan(self.lower):
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} [{self.lower:.{digits}f}, {self.upper:.{digits}f}]"


def _check(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} of {s.size} scores are NaN or infinite")
    return y, s


def _tie_groups(s: np.ndarray, descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """Sort order and start index of each run of equal scores in that order."""
    order = np.argsort(-s if descending else s, kind="stable")
    sorted_s = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    return order, starts


def _group_sums(weights: np.ndarray, starts: np.ndarray) -> np.ndarray:
    return np.add.reduceat(weights, starts, axis=-1)


def _auroc_weighted(pos_w: np.ndarray, neg_w: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """AUROC for rows of weights over ascending-sorted scores: P(s+ > s-) + P(tie) / 2."""
    pos_g, neg_g = _group_sums(pos_w, starts), _group_sums(neg_w, starts)
    neg_below = np.cumsum(neg_g, axis=-1) - neg_g
    pairs = pos_g.sum(-1) * neg_g.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, (pos_g * (neg_below + 0.5 * neg_g)).sum(-1) / pairs, np.nan)


def _auprc_weighted(pos_w: np.ndarray, neg_w: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Average precision for rows of weights over descending-sorted scores (step-wise, no interpolation)."""
    pos_g, neg_g = _group_sums(pos_w, starts), _group_sums(neg_w, starts)
    tp, fp = np.cumsum(pos_g, axis=-1), np.cumsum(neg_g, axis=-1)
    total_pos = pos_g.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        ap = (pos_g * precision).sum(-1) / total_pos
        has_both = (total_pos > 0) & (neg_g.sum(-1) > 0)
    return np.where(has_both, ap, np.nan)


_METRICS = {"auroc": (_auroc_weighted, False), "auprc": (_auprc_weighted, True)}


def _point(metric: str, y: np.ndarray, s: np.ndarray) -> float:
    fn, descending = _METRICS[metric]
    order, starts = _tie_groups(s, descending)
    ys = y[order].astype(np.float64)
    return float(fn(ys, 1.0 - ys, starts))


def auroc(y_true, y_score) -> float:
    """Area under the ROC curve (ties count one half); NaN when a class is absent."""
    return _point("auroc", *_check(y_true, y_score))


def auprc(y_true, y_score) -> float:
    """Average precision, as scikit-learn's average_precision_score; NaN when a class is absent."""
    return _point("auprc", *_check(y_true, y_score))


def bootstrap_weights(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) multiplicities: how many times each of n items is drawn in each resample."""
    draws = rng.integers(0, n, size=(n_boot, n))
    offsets = (np.arange(n_boot) * n)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def _weight_chunks(n: int, n_boot: int, seed: int, chunk_elems: int, groups: np.ndarray | None = None):
    """Seeded per-row resample multiplicities in chunks of about `chunk_elems` floats (same stream for
    any caller). With `groups`, the groups are drawn and each row takes its group's multiplicity."""
    rng = np.random.default_rng(seed)
    chunk = max(1, chunk_elems // max(1, n))
    if groups is None:
        for first in range(0, n_boot, chunk):
            yield bootstrap_weights(n, min(chunk, n_boot - first), rng)
        return
    _, inverse = np.unique(groups, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.size else 0
    for first in range(0, n_boot, chunk):
        yield bootstrap_weights(n_groups, min(chunk, n_boot - first), rng)[:, inverse]


def _check_groups(groups, n: int) -> np.ndarray | None:
    if groups is None:
        return None
    groups = np.asarray(groups).ravel()
    if groups.shape[0] != n:
        raise ValueError(f"groups has {groups.shape[0]} entries for {n} rows")
    return groups


def _resampled(
    metric: str,
    y: np.ndarray,
    scores: list[np.ndarray],
    n_boot: int,
    seed: int,
    chunk_elems: int,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """The metric of each score vector on the same `n_boot` person resamples (NaN: a class absent)."""
    fn, descending = _METRICS[metric]
    prepared = [(order, starts, y[order]) for order, starts in (_tie_groups(s, descending) for s in scores)]
    values: list[list[np.ndarray]] = [[] for _ in scores]
    for weights in _weight_chunks(y.size, n_boot, seed, chunk_elems // max(1, len(scores)), groups):
        for out, (order, starts, ys) in zip(values, prepared):
            w = weights[:, order]
            out.append(fn(w * ys, w * ~ys, starts))
    return [np.concatenate(v) for v in values]


def _percentile_estimate(value: float, boot: np.ndarray, n_boot: int, alpha: float) -> Estimate:
    valid = boot[~np.isnan(boot)]
    if valid.size == 0:
        return Estimate(value, np.nan, np.nan, n_boot, 0)
    lower, upper = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
    se = float(np.std(valid, ddof=1)) if valid.size > 1 else float("nan")
    return Estimate(value, float(lower), float(upper), n_boot, int(valid.size), se)


def _check_metric(metric: str) -> None:
    if metric not in _METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {sorted(_METRICS)}")


def bootstrap_metric(
    metric: str,
    y_true,
    y_score,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    alpha: float = 0.05,
    chunk_elems: int = 20_000_000,
    groups=None,
) -> Estimate:
    """Point estimate and percentile (1 - alpha) interval over `n_boot` seeded resamples (of rows, or
    of `groups` such as subject ids)."""
    _check_metric(metric)
    y, s = _check(y_true, y_score)
    groups = _check_groups(groups, y.size)
    value = _point(metric, y, s)
    if n_boot <= 0 or y.size == 0:
        return Estimate(value, np.nan, np.nan)
    (boot,) = _resampled(metric, y, [s], n_boot, seed, chunk_elems, groups)
    return _percentile_estimate(value, boot, n_boot, alpha)


def bootstrap_difference(
    metric: str,
    y_true,
    score_a,
    score_b,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    alpha: float = 0.05,
    chunk_elems: int = 20_000_000,
    groups=None,
) -> Estimate:
    """metric(a) - metric(b) on the same persons, with a paired percentile interval.

    Both models are scored on each resample, so the interval reflects the difference's own
    spread (much narrower than two separate intervals when the models' errors are correlated).
    With the same seed each resample is the one `bootstrap_metric` draws.
    """
    return bootstrap_contrast(metric, y_true, [score_a, score_b], [1.0, -1.0], n_boot, seed, alpha, chunk_elems, groups)


def bootstrap_contrast(
    metric: str,
    y_true,
    scores,
    weights,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    alpha: float = 0.05,
    chunk_elems: int = 20_000_000,
    groups=None,
) -> Estimate:
    """sum_i weights[i] * metric(scores[i]) on the same persons, with a paired percentile interval:
    e.g. (a - b) - 0.6 (c - d) asks whether one model's gain reaches 0.6 of another's, with every
    model scored on each resample (the same resamples as `bootstrap_metric` with the same seed)."""
    _check_metric(metric)
    if len(scores) != len(weights) or not scores:
        raise ValueError(f"{len(scores)} score vectors and {len(weights)} weights: need one weight per vector")
    checked = [_check(y_true, s) for s in scores]
    y = checked[0][0]
    vectors = [s for _, s in checked]
    groups = _check_groups(groups, y.size)
    value = float(sum(w * _point(metric, y, s) for w, s in zip(weights, vectors)))
    if n_boot <= 0 or y.size == 0:
        return Estimate(value, np.nan, np.nan)
    boots = _resampled(metric, y, vectors, n_boot, seed, len(vectors) * chunk_elems, groups)
    return _percentile_estimate(value, sum(w * b for w, b in zip(weights, boots)), n_boot, alpha)


def auroc_ci(
    y_true, y_score, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0, alpha: float = 0.05, groups=None
) -> Estimate:
    return bootstrap_metric("auroc", y_true, y_score, n_boot, seed, alpha, groups=groups)


def auprc_ci(
    y_true, y_score, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0, alpha: float = 0.05, groups=None
) -> Estimate:
    return bootstrap_metric("auprc", y_true, y_score, n_boot, seed, alpha, groups=groups)
