"""Cross-fitted heads: every label row scored by a head that never saw it, so all rows count.

A held-out test split of a 20k cohort holds ~40 T2D events, too few to resolve the 0.01-0.03 AUROC
differences at stake (#21). Cross-fitting uses every label row instead: the persons are dealt into
K folds (all rows of a person in one fold, a pure function of the seed and the set of subject ids),
each fold is scored by heads fit on the other K - 1 folds, and the pooled out-of-fold risks are
compared with a paired bootstrap over persons (a resample draws persons and keeps all their rows:
one person's label rows are correlated, and resampling rows would make the intervals too narrow).
The heads and their inputs are the few-shot protocol's
(evaluate/few_shot.py: the frozen FM features with an L2 logistic regression, the count baselines
with LR and gradient boosting), fit on full folds with the same fixed settings.

The report gives each head's AUROC / AUPRC with bootstrap CIs, each FM head's paired difference to
every count head with its minimum detectable difference (80% power, two-sided 5%), and the event
count; a difference is judged against a target only on at least MIN_EVENTS_FOR_TARGET events.

With fm_lr_no_prs beside fm_lr, and a count head with and without the PRS, it also gives the PRS
gains on all rows: the FM's (fm_lr - fm_lr_no_prs), gradient boosting's from the same score
(counts_prs_hgb - counts_hgb) and the contrast FM gain - MIN_PRS_GAIN_SHARE x boosting's gain with
its paired interval: the PRS target (#21) asks that contrast to be >= 0.

Scores computed elsewhere for every label row (`fixed`: the zero-shot job's path probability, which
fits nothing, so it needs no folds) join the table as heads of their own; with `zero_shot` there the
report judges the zero-shot target on all rows: fm_lr - zero_shot <= MAX_ZERO_SHOT_GAP.

Every head also gets its ECE, raw and after a cross-fitted Platt map: fold k's risks recalibrated
by a map fit on the other folds' out-of-fold risks (two parameters fit on ~19,000 rows; the rows of
fold k never fit the map that recalibrates them), judged against MAX_RECALIBRATED_ECE.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from threadpoolctl import threadpool_limits

from ehrfm.calibration import apply_platt, logit, platt_or_none
from ehrfm.evaluate.calibration import expected_calibration_error
from ehrfm.evaluate.few_shot import (
    COUNT_MODELS,
    FM_ENS,
    FM_ENS_NO_PRS,
    FM_LR,
    FM_LR_NO_PRS,
    FM_MODELS,
    FewShotConfig,
    Head,
    fit_and_score,
)
from ehrfm.evaluate.targets import (
    MAX_RECALIBRATED_ECE,
    MAX_ZERO_SHOT_GAP,
    MIN_EVENTS_FOR_TARGET,
    MIN_PRS_GAIN_SHARE,
)
from ehrfm.metrics import Estimate, auprc_ci, auroc_ci, bootstrap_contrast, bootstrap_difference

ZERO_SHOT = "zero_shot"  # the zero-shot path probability, read from its job's output (a head that fits nothing)

# (with the PRS, without it): the pairs whose difference is a model's PRS gain
PRS_PAIRS = {
    "fm_lr": (FM_LR, FM_LR_NO_PRS),
    "fm_ens": (FM_ENS, FM_ENS_NO_PRS),
    "counts_hgb": ("counts_prs_hgb", "counts_hgb"),
    "counts_lr": ("counts_prs_lr", "counts_lr"),
}


def person_folds(subject_ids: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold (0..folds-1) of each row: persons shuffled by `seed`, then dealt round-robin, so the folds
    differ in size by at most one person and a person's rows share a fold."""
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    persons, inverse = np.unique(np.asarray(subject_ids), return_inverse=True)
    if len(persons) < folds:
        raise ValueError(f"{len(persons)} persons cannot fill {folds} folds")
    order = np.random.default_rng(np.random.SeedSequence([seed, folds])).permutation(len(persons))
    fold_of_person = np.empty(len(persons), dtype=np.int64)
    fold_of_person[order] = np.arange(len(persons)) % folds
    return fold_of_person[inverse]


def cross_fit(
    designs: Mapping[str, Head], y: np.ndarray, fold: np.ndarray, config: FewShotConfig
) -> dict[str, np.ndarray]:
    """Out-of-fold risk of every row for every head."""
    y = np.asarray(y).astype(int).ravel()
    risks = {name: np.full(len(y), np.nan) for name in designs}
    with threadpool_limits(limits=config.threads):
        for k in np.unique(fold):
            held_out, fit_rows = np.flatnonzero(fold == k), np.flatnonzero(fold != k)
            if not 0 < y[fit_rows].sum() < len(fit_rows):
                raise ValueError(f"fold {k}: the other folds hold one class only")
            fitted: dict[int, np.ndarray] = {}  # members shared by heads are fit once per fold
            for name, design in designs.items():
                risks[name][held_out] = fit_and_score(design, y, fit_rows, held_out, config, fitted=fitted)
    return risks


def recalibrated_out_of_fold(risk: np.ndarray, y: np.ndarray, fold: np.ndarray) -> tuple[np.ndarray, int]:
    """Each fold's risks through the Platt map of the other folds' (risk, label) rows, and how many
    folds kept their raw risks because the map was refused (a score anti-correlated there)."""
    out, refused = np.asarray(risk, np.float64).copy(), 0
    for k in np.unique(fold):
        rows = fold == k
        platt = platt_or_none(logit(risk[~rows]), y[~rows])
        if platt is None:
            refused += 1
            continue
        out[rows] = apply_platt(platt, logit(risk[rows]))
    return out, refused


def cross_fit_report(
    designs: Mapping[str, Head],
    y: np.ndarray,
    subject_ids: np.ndarray,
    config: FewShotConfig,
    n_boot: int = 1000,
    fixed: Mapping[str, np.ndarray] | None = None,
) -> dict:
    """The heads' out-of-fold metrics and the FM head's paired differences (aggregates only).
    `fixed`: scores of every row computed elsewhere (ZERO_SHOT), compared as they are."""
    y = np.asarray(y).astype(int).ravel()
    fold = person_folds(subject_ids, config.cross_fit_folds, config.seed)
    risks = cross_fit(designs, y, fold, config)
    for name, score in (fixed or {}).items():
        score = np.asarray(score, np.float64).ravel()
        if score.shape != y.shape or not np.isfinite(score).all():
            raise ValueError(f"{name}: needs a finite score for each of the {len(y)} label rows")
        risks[name] = score
    events = int(y.sum())
    judgeable = events >= MIN_EVENTS_FOR_TARGET
    models = {}
    for name, risk in risks.items():
        roc = auroc_ci(y, risk, n_boot, config.seed, groups=subject_ids)
        pr = auprc_ci(y, risk, n_boot, config.seed, groups=subject_ids)
        recalibrated, refused = recalibrated_out_of_fold(risk, y, fold)
        ece = expected_calibration_error(y, recalibrated)
        models[name] = {
            "auroc": roc.value,
            "auroc_ci": [roc.lower, roc.upper],
            "auprc": pr.value,
            "auprc_ci": [pr.lower, pr.upper],
            "ece": expected_calibration_error(y, risk),
            "ece_recalibrated": ece,
            "platt_refused_folds": refused,
            "ece_target_met": bool(judgeable and refused == 0 and ece <= MAX_RECALIBRATED_ECE),
        }
    comparisons = {}
    for fm in (m for m in (*FM_MODELS, ZERO_SHOT) if m in risks):  # every FM head against every count head
        for name in (m for m in COUNT_MODELS if m in risks):
            diff = bootstrap_difference("auroc", y, risks[fm], risks[name], n_boot, config.seed, groups=subject_ids)
            comparisons[f"{fm}-{name}"] = _interval(diff)
    return {
        "folds": config.cross_fit_folds,
        "rows": int(len(y)),
        "events": events,
        "judgeable": judgeable,
        "n_boot": n_boot,
        "resampled": "persons",
        "max_recalibrated_ece": MAX_RECALIBRATED_ECE,
        "models": models,
        "comparisons": comparisons,
        "prs_gains": prs_gains(risks, y, subject_ids, n_boot, config.seed),
        "zero_shot": zero_shot_gap(risks, y, subject_ids, n_boot, config.seed, judgeable),
    }


def zero_shot_gap(
    risks: Mapping[str, np.ndarray], y: np.ndarray, subject_ids: np.ndarray, n_boot: int, seed: int, judgeable: bool
) -> dict | None:
    """fm_lr - zero_shot with its paired interval; the target is met when the whole interval is at
    most MAX_ZERO_SHOT_GAP on enough events (a zero-shot score better than the head meets it too)."""
    if ZERO_SHOT not in risks or FM_LR not in risks:
        return None
    gap = bootstrap_difference("auroc", y, risks[FM_LR], risks[ZERO_SHOT], n_boot, seed, groups=subject_ids)
    return {
        "head": FM_LR,
        **_interval(gap),
        "max_gap": MAX_ZERO_SHOT_GAP,
        "met": bool(judgeable and gap.upper <= MAX_ZERO_SHOT_GAP),
    }


def _interval(estimate: Estimate) -> dict:
    mdd = estimate.minimum_detectable()
    return {
        "auroc_difference": estimate.value,
        "ci": [estimate.lower, estimate.upper],
        "minimum_detectable_difference": mdd if math.isfinite(mdd) else None,
    }


def prs_gains(risks: Mapping[str, np.ndarray], y: np.ndarray, subject_ids: np.ndarray, n_boot: int, seed: int) -> dict:
    """Each model's AUROC gain from the PRS (PRS_PAIRS whose two heads were fit) with paired CIs, and
    for each FM head whose pair is there beside boosting's, the target's contrast: FM gain - share x
    boosting's (`targets`, by FM head)."""
    present = {name: pair for name, pair in PRS_PAIRS.items() if all(m in risks for m in pair)}
    gains = {
        name: _interval(bootstrap_difference("auroc", y, risks[a], risks[b], n_boot, seed, groups=subject_ids))
        for name, (a, b) in present.items()
    }
    out: dict = {"gains": gains}
    if "counts_hgb" not in present:
        return out
    hgb = PRS_PAIRS["counts_hgb"]
    hgb_gain = gains["counts_hgb"]["auroc_difference"]
    targets = {}
    for head in (h for h in present if h in FM_MODELS):  # fm_lr, fm_ens: the FM heads with a PRS pair
        fm = PRS_PAIRS[head]
        scores = [risks[fm[0]], risks[fm[1]], risks[hgb[0]], risks[hgb[1]]]
        weights = [1.0, -1.0, -MIN_PRS_GAIN_SHARE, MIN_PRS_GAIN_SHARE]
        contrast = bootstrap_contrast("auroc", y, scores, weights, n_boot, seed, groups=subject_ids)
        fm_gain = gains[head]["auroc_difference"]
        targets[head] = {
            "share": MIN_PRS_GAIN_SHARE,
            "fm_gain_minus_share_of_hgb_gain": contrast.value,
            "ci": [contrast.lower, contrast.upper],
            "ratio": fm_gain / hgb_gain if hgb_gain > 0 else None,  # a point figure; the contrast has the CI
        }
    if targets:
        out["targets"] = targets
    return out


def cross_fit_markdown(report: dict, published_rows: str, published_events: str) -> str:
    """The cross-fit section of few_shot.md (counts as the small-count rule publishes them)."""
    verdict = (
        "enough events to judge a target"
        if report["judgeable"]
        else f"fewer than {MIN_EVENTS_FOR_TARGET} events: read differences against their MDD, judge no target"
    )
    lines = [
        f"## Cross-fitted heads on all label rows ({report['folds']} person folds)",
        "",
        f"Rows {published_rows} ({published_events} positive): {verdict}.",
        "",
        "| model | AUROC [95% CI] | AUPRC [95% CI] | ECE raw / cross-fitted Platt |",
        "|---|---|---|---|",
    ]
    for name, m in report["models"].items():
        refused = f" (Platt refused on {m['platt_refused_folds']} folds)" if m["platt_refused_folds"] else ""
        lines.append(
            f"| {name} | {m['auroc']:.3f} [{m['auroc_ci'][0]:.3f}, {m['auroc_ci'][1]:.3f}] | "
            f"{m['auprc']:.3f} [{m['auprc_ci'][0]:.3f}, {m['auprc_ci'][1]:.3f}] | "
            f"{m['ece']:.3f} / {m['ece_recalibrated']:.3f}{refused} |"
        )
    met = [name for name, m in report["models"].items() if m["ece_target_met"]]
    if report["judgeable"]:
        lines += [
            "",
            f"ECE <= {report['max_recalibrated_ece']} after recalibration: "
            + (", ".join(met) if met else "no head")
            + ".",
        ]
    if report["comparisons"]:
        lines += ["", "| paired AUROC difference | value [95% CI] | minimum detectable |", "|---|---|---|"]
        lines += [_difference_row(name, c) for name, c in report["comparisons"].items()]
    prs = report.get("prs_gains") or {}
    if prs.get("gains"):
        lines += ["", "| PRS gain (with - without the score) | value [95% CI] | minimum detectable |", "|---|---|---|"]
        lines += [_difference_row(name, c) for name, c in prs["gains"].items()]
    for head, t in (prs.get("targets") or {}).items():
        ratio = "n/a (boosting gains nothing)" if t["ratio"] is None else f"{t['ratio']:.2f}"
        lines += [
            "",
            f"{head} PRS gain - {t['share']} x boosting's: {t['fm_gain_minus_share_of_hgb_gain']:+.3f} "
            f"[{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}] (target >= 0); ratio of the gains {ratio}.",
        ]
    gap = report.get("zero_shot")
    if gap:
        verdict = "met" if gap["met"] else ("not met" if report["judgeable"] else "not judged")
        lines += [
            "",
            f"{gap['head']} - zero_shot: {gap['auroc_difference']:+.3f} [{gap['ci'][0]:+.3f}, {gap['ci'][1]:+.3f}] "
            f"(minimum detectable {_mdd(gap)}; target: the whole interval <= {gap['max_gap']}): {verdict}.",
        ]
    return "\n".join(lines) + "\n"


def _mdd(c: dict) -> str:
    mdd = c["minimum_detectable_difference"]
    return "n/a" if mdd is None else f"{mdd:.3f}"


def _difference_row(name: str, c: dict) -> str:
    return f"| {name} | {c['auroc_difference']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] | {_mdd(c)} |"
