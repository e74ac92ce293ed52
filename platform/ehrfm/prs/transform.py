"""PRS -> per-person z-scores, fit on the train split only, optionally ancestry-adjusted.

Raw polygenic scores are on arbitrary scales and shift with genetic ancestry. Two transforms:
- plain: z = (x - mean) / sd, mean and sd of the train persons' scores (per PGS);
- with genetic PCs: the mean and the variance of each PGS are regressed on the PCs (train persons
  only): mean by least squares on [1, PCs], variance by a Gamma GLM with log link on the squared
  residuals (fit by IRLS), and z = (x - mean(PCs)) / sqrt(var(PCs)). This is the common
  "ancestry-normalised" PRS (e.g. pgsc_calc's Z_norm2); a person with scores but no PCs gets the
  plain transform, and is counted.
Missing scores stay NaN through the transform and become 0 (the train mean) in the output, counted.
The fitted transform is saved next to the scores so the same numbers can be applied to new persons.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_IRLS_STEPS = 50
_IRLS_TOL = 1e-10
_MIN_REFERENCE = 3  # train persons with a score needed to fit a transform


@dataclass
class PrsTransform:
    """Per-PGS parameters; `mean_coef`/`log_var_coef` are [K, 1 + n_pcs] over standardised PCs."""

    pgs_ids: list[str]
    mean: np.ndarray
    sd: np.ndarray
    pc_center: np.ndarray | None = None
    pc_scale: np.ndarray | None = None
    mean_coef: np.ndarray | None = None
    log_var_coef: np.ndarray | None = None
    summary: dict = field(default_factory=dict)

    @property
    def ancestry_adjusted(self) -> bool:
        return self.mean_coef is not None

    def apply(self, values: np.ndarray, pcs: np.ndarray | None = None) -> np.ndarray:
        """z-scores (float32, NaN where the input is NaN); rows of `pcs` with NaN use the plain transform."""
        values = np.asarray(values, dtype=np.float64)
        z = (values - self.mean) / self.sd
        if self.ancestry_adjusted and pcs is not None:
            has_pcs = np.isfinite(pcs).all(axis=1)
            design = self._design(pcs[has_pcs])
            centre = design @ self.mean_coef.T
            spread = np.sqrt(np.exp(design @ self.log_var_coef.T))
            z[has_pcs] = (values[has_pcs] - centre) / spread
        return z.astype(np.float32)

    def _design(self, pcs: np.ndarray) -> np.ndarray:
        scaled = (np.asarray(pcs, dtype=np.float64) - self.pc_center) / self.pc_scale
        return np.column_stack([np.ones(len(scaled)), scaled])

    def to_dict(self) -> dict:
        def listed(a: np.ndarray | None) -> list | None:
            return None if a is None else np.asarray(a, dtype=np.float64).tolist()

        return {
            "pgs_ids": self.pgs_ids,
            "mean": listed(self.mean),
            "sd": listed(self.sd),
            "pc_center": listed(self.pc_center),
            "pc_scale": listed(self.pc_scale),
            "mean_coef": listed(self.mean_coef),
            "log_var_coef": listed(self.log_var_coef),
            "summary": self.summary,
        }

    @classmethod
    def from_dict(cls, data: dict) -> PrsTransform:
        arrays = {
            k: (None if data[k] is None else np.asarray(data[k], dtype=np.float64))
            for k in ("mean", "sd", "pc_center", "pc_scale", "mean_coef", "log_var_coef")
        }
        return cls(pgs_ids=list(data["pgs_ids"]), summary=dict(data.get("summary", {})), **arrays)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")


def _gamma_log_glm(projector: np.ndarray, design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Coefficients [p, k] of Gamma GLMs with log link, one per column of `target` [n, k], by IRLS.

    For this family the IRLS working weights are constant, so every step is the same least-squares
    projection (`projector` = pinv(design)) of the working response: all columns step together.
    """
    positive = np.maximum(target, np.finfo(np.float64).tiny)
    coef = np.zeros((design.shape[1], target.shape[1]))
    coef[0] = np.log(positive.mean(axis=0))
    for _ in range(_IRLS_STEPS):
        eta = design @ coef
        mu = np.exp(eta)
        new = projector @ (eta + (positive - mu) / mu)
        done = np.max(np.abs(new - coef)) < _IRLS_TOL
        coef = new
        if done:
            break
    return coef


def fit_prs_transform(
    values: np.ndarray, train: np.ndarray, pgs_ids: list[str], pcs: np.ndarray | None = None
) -> PrsTransform:
    """Fit on the rows where `train` is true (persons with scores); `pcs` rows align with `values`."""
    values = np.asarray(values, dtype=np.float64)
    reference = values[train]
    n_ref = np.isfinite(reference).sum(axis=0)
    if len(pgs_ids) and n_ref.min(initial=len(reference)) < _MIN_REFERENCE:
        raise ValueError(
            f"PRS z-scoring needs at least {_MIN_REFERENCE} train persons with each score; "
            f"the sparsest PGS has {int(n_ref.min())}"
        )
    mean = np.nanmean(reference, axis=0) if len(pgs_ids) else np.zeros(0)
    sd = np.nanstd(reference, axis=0) if len(pgs_ids) else np.zeros(0)
    constant = int((sd == 0).sum())
    sd = np.where(sd > 0, sd, 1.0)
    transform = PrsTransform(
        list(pgs_ids),
        mean,
        sd,
        summary={"reference_persons": int(len(reference)), "constant_pgs": constant, "ancestry_adjusted": False},
    )
    if pcs is None or not len(pgs_ids):
        return transform
    train_pcs = np.asarray(pcs, dtype=np.float64)[train]
    has_pcs = np.isfinite(train_pcs).all(axis=1)
    if has_pcs.sum() <= train_pcs.shape[1] + 1:
        raise ValueError(
            f"ancestry adjustment needs more train persons with PCs than PCs + 1; got {int(has_pcs.sum())}"
        )
    center = train_pcs[has_pcs].mean(axis=0)
    scale = train_pcs[has_pcs].std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    transform.pc_center, transform.pc_scale = center, scale
    design_all = transform._design(train_pcs[has_pcs])
    ref = reference[has_pcs]
    k = len(pgs_ids)
    mean_coef = np.zeros((k, design_all.shape[1]))
    log_var_coef = np.zeros((k, design_all.shape[1]))
    finite = np.isfinite(ref)
    patterns: dict[bytes, list[int]] = {}
    for j in range(k):  # PGS missing in the same persons share one projection
        patterns.setdefault(np.packbits(finite[:, j]).tobytes(), []).append(j)
    for columns in patterns.values():
        rows = finite[:, columns[0]]
        design = design_all[rows]
        projector = np.linalg.pinv(design)
        y = ref[np.ix_(rows, columns)]
        coef = projector @ y
        mean_coef[columns] = coef.T
        log_var_coef[columns] = _gamma_log_glm(projector, design, (y - design @ coef) ** 2).T
    transform.mean_coef, transform.log_var_coef = mean_coef, log_var_coef
    transform.summary.update(
        {"ancestry_adjusted": True, "reference_persons_with_pcs": int(has_pcs.sum()), "n_pcs": int(train_pcs.shape[1])}
    )
    return transform
