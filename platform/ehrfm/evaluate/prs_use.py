"""Does the fine-tuned model use the PRS the way the disease's score says it should?

An AUROC gain over the PRS-masked model is the task's verdict, but on a few dozen events it is
mostly noise, and it cannot say whether a small gain means "the model ignores the PRS" or "the
PRS carries little beyond the clinical record". This diagnostic separates the two: the PRS's
effect on each genotyped person's logit (PRS on minus PRS masked, same weights) should rise
with the trait's own score. It uses every genotyped test row, not only the events, so it is
far tighter than the AUROC gain.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import logit

MIN_ROWS = 10


@dataclass(frozen=True)
class PRSUse:
    pgs_id: str | None
    n_genotyped: int
    logit_shift_sd: float  # how far the PRS moves the logit, on the genotyped rows
    corr_with_pgs: float  # Pearson r of that shift with the trait's PGS
    ci_low: float  # 95% CI of r (Fisher z)
    ci_high: float

    def to_dict(self) -> dict:
        return asdict(self)


def prs_use(risk: np.ndarray, risk_masked: np.ndarray, pgs: np.ndarray, pgs_id: str | None = None) -> PRSUse | None:
    """`pgs` is NaN where the person has no PRS. None when too few genotyped rows or no variation."""
    genotyped = ~np.isnan(pgs)
    n = int(genotyped.sum())
    if n < MIN_ROWS:
        return None
    shown, masked = logit(np.clip(np.asarray([risk, risk_masked], dtype=np.float64), 1e-7, 1 - 1e-7))  # 0/1 stay finite
    shift = (shown - masked)[genotyped]
    score = pgs[genotyped]
    if shift.std() == 0 or score.std() == 0:
        return None
    r = float(np.corrcoef(shift, score)[0, 1])
    z, half = np.arctanh(np.clip(r, -0.999999, 0.999999)), 1.959964 / np.sqrt(max(n - 3, 1))
    return PRSUse(pgs_id, n, float(shift.std()), r, float(np.tanh(z - half)), float(np.tanh(z + half)))
