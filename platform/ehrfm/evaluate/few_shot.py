"""The few-shot protocol, the EHRSHOT way: how fast does each model learn from few labeled rows?

For each k in `shots` and each of `replicates` draws, k positive and k negative label rows are
drawn without replacement from the train split only (never val or test rows); each head is fit on
those 2k rows alone and scored on every test row (AUROC, AUPRC). A draw is a pure function of
(seed, k, replicate), so adding a k or a model never changes another k's draws. Positive and
negative rows are drawn at the row level: one person may give several rows.

Heads (no validation split: the LR heads choose their C inside their own fit rows, the boosting
heads have fixed settings):
- fm_lr: L2 logistic regression (C chosen from `lr_cs` by `lr_cv_folds` = 3 stratified folds of
  the shots, the fixed `lr_c` when a class has fewer rows than folds, k = 1 and 2, or with
  `lr_cv_folds=0`; features standardised on every train row's features without their labels,
  `scale_on=train`, since two shots alone would scale every column to +-1) on the frozen
  decoder's last-token state (`fm_inputs=last+mean`: and its mean state over every window read,
  `history_windows` of them), computed with each person's PRS as recorded; `fm_prs` adds the
  decoder's PRS summary or the raw z-scores (0 where missing) with a has-PRS flag.
- counts_lr / counts_prs_lr: the same regression on the baselines' count features (log1p counts,
  last values, max-abs scaled on the shots), without / with the PRS columns.
- counts_hgb / counts_prs_hgb: HistGradientBoosting on the baselines' dense count columns
  (chosen on the train rows without their labels), without / with the PRS columns;
  min_samples_leaf = min(20, max(1, 2k // 10)) unless `hgb_min_samples_leaf` is set, so k = 1
  (two rows) can still split and k = 128 keeps scikit-learn's default of 20. Early stopping
  (`hgb_early_stopping`, default auto) as scikit-learn's own default: on a stratified 10% of the
  fit rows when they are more than 10,000 (the cross-fit's folds), never for the few shots.
  `hgb_bags=B`: a boosting head that stops early is the mean logit of B fits, each on its own
  validation draw (the fits without early stopping are deterministic, so they stay single).
- fm_hgb (opt-in): the same boosting on fm_lr's inputs, a non-linear head on the frozen states,
  except that the value-bin readout reaches it as one bin number per (recency bucket, code), NaN
  where unmeasured (`fm_boosted_design`): a tree splits one ordered column where ten indicators
  would each need a split (cross-fitted on the 20k cohort: 0.776 with numbers, 0 for unmeasured;
  0.785 with NaN).
- fm_ens (opt-in): fm_lr and fm_hgb fit apart on the same rows, their logits averaged with equal
  weights (nothing chosen on the labels). The two heads read the same frozen decoder, one as
  linear steps, one as interactions between values; on the 20k cohort their out-of-fold logits
  correlate at 0.85, and the mean beats either (README, #21).
- fm_counts_hgb (opt-in): the boosting on counts_prs_hgb's columns plus fm_lr's states, asking
  whether the decoder's states add anything to the strongest count model.
- fm_lr_no_prs (opt-in): fm_lr with the PRS taken away everywhere: the states come from a second
  forward pass with every person's PRS masked (the model's missing-PRS path), and it reads no PRS
  summary or score columns whatever `fm_prs` says. fm_lr - fm_lr_no_prs is the FM's PRS gain,
  measured as counts_prs_hgb - counts_hgb measures gradient boosting's (two heads fit apart, one
  with the score and one without). fm_ens_no_prs (opt-in) is fm_ens on those inputs.
Nothing is skipped silently: a k with fewer than k train positives (or negatives), or a head that
cannot be fit, is recorded with NaN metrics and the reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.sparse as sp
from pydantic import Field, field_validator, model_validator
from scipy.special import expit
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import MaxAbsScaler, StandardScaler
from threadpoolctl import threadpool_limits

from ehrfm.calibration import logit
from ehrfm.config import StrictModel
from ehrfm.evaluate.baselines import BaselineConfig, dense_columns, lr_design, prs_design
from ehrfm.evaluate.features import FeatureMatrix
from ehrfm.metrics import auprc, auroc
from ehrfm.model.value_bins import ValueEncoding

TRAIN, TEST = "train", "test"
FM_LR, FM_HGB, FM_COUNTS_HGB = "fm_lr", "fm_hgb", "fm_counts_hgb"
FM_LR_NO_PRS = "fm_lr_no_prs"  # fm_lr without the PRS anywhere: the decoder's PRS masked, no PRS columns
FM_ENS = "fm_ens"  # fm_lr and fm_hgb, their logits averaged
FM_ENS_NO_PRS = "fm_ens_no_prs"  # fm_ens on fm_lr_no_prs's inputs: the ensemble's own PRS gain
FM_MODELS = (
    FM_LR,
    FM_HGB,
    FM_ENS,
    FM_COUNTS_HGB,
    FM_LR_NO_PRS,
    FM_ENS_NO_PRS,
)  # heads that read the frozen decoder's states
# values_hgb (opt-in): boosting on the last measured values and age alone, no code counts: shows
# how much of counts_hgb's lead comes from thresholds on a few lab values
VALUES_HGB = "values_hgb"
COUNT_MODELS = ("counts_lr", "counts_prs_lr", "counts_hgb", "counts_prs_hgb", VALUES_HGB)
MODELS = (*FM_MODELS, *COUNT_MODELS)
DEFAULT_MODELS = (FM_LR, *(m for m in COUNT_MODELS if m != VALUES_HGB))
METRICS = ("auroc", "auprc")


class FewShotConfig(StrictModel):
    """The protocol's settings (EHRSHOT: k in 1..128, 5 replicates)."""

    shots: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128])
    replicates: int = Field(5, ge=1)
    seed: int = 0
    models: list[str] = Field(default_factory=lambda: list(DEFAULT_MODELS))
    lr_c: float = Field(1.0, gt=0)  # inverse L2 strength of every logistic-regression head
    # >= 2: each LR head picks its C from lr_cs by this many stratified folds of its own fit rows
    # (AUROC), as EHRSHOT tunes its heads; lr_c when a class has fewer rows than folds (k = 1, 2);
    # 0: always lr_c. Default 3: on the 20k cohort a fixed C = 1 overfit from k = 32 on (fm_lr on
    # the previous backbone 0.688 / 0.634 / 0.609 at k = 32 / 64 / 128, tuned 0.722 / 0.729 / 0.740)
    lr_cv_folds: int = Field(3, ge=0)
    lr_cs: list[float] = Field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0])
    # where the LR heads' feature scaling is fit: on the 2k shots, or on every train-split row's
    # features without their labels (as the count vocabulary is); 2 shots scale every column to +-1
    scale_on: Literal["shots", "train"] = "train"
    lr_max_iter: int = 2000
    hgb_max_iter: int = 100
    hgb_learning_rate: float = 0.1
    hgb_min_samples_leaf: int | None = Field(None, ge=1)  # None: min(20, max(1, 2k // 10))
    # auto: on above HGB_EARLY_STOPPING_ROWS fit rows (scikit-learn's rule). Cross-fitted on the 20k
    # cohort, 100 rounds without it overfit: counts_prs_hgb 0.787 against 0.798 with it (README)
    hgb_early_stopping: Literal["auto", "on", "off"] = "auto"
    # boosting that stops early: the mean logit of this many fits, each stopping on its own random
    # validation tenth (seeds seed, seed + 1, ...). One tenth of a 20k cohort's fold holds ~76 events,
    # so where a fit stops is noisy: cross-fitted counts_prs_hgb ranged 0.789-0.798 over 5 seeds,
    # and their 5-fit mean scored 0.809 (test bed: 0.796 -> 0.816). Default 5: the count baselines
    # are the bar the FM must reach, so they get the stronger form (README, #21). 1: a single fit
    hgb_bags: int = Field(5, ge=1)
    # the count features, built as the baselines build them: windows_days, min_persons_per_code,
    # max_codes and hgb_max_dense_features are read (the baselines' fitting settings are not)
    features: BaselineConfig = Field(default_factory=BaselineConfig)
    batch_size: int = Field(256, ge=1)  # rows per forward pass of the frozen decoder
    context: int | None = None  # window length; None: the pretrained model's
    history_windows: int = Field(
        1, ge=1, le=64
    )  # windows of history read per row (the fine-tune's data.history_windows)
    fm_inputs: Literal["last", "last+mean"] = "last"  # + the mean state over every window read
    # how the PRS reaches the FM heads: `states` (default), only through the states the decoder
    # computed with it (its PRS fusion), so the head reads the FM's representation and nothing else;
    # `summary`, also the decoder's PRS summary vector (the mean PRS soft token, what the fine-tune's
    # `+prs` head reads, H wide); `scores`, also the z-scores and a has-PRS flag as K + 1 columns
    # (129 on the default cohort: as many as the states, mostly noise to 2k shots). 20k cohort,
    # fm_lr cross-fitted: 0.762 / 0.766 / 0.758; few-shot, k = 32: 0.731 / 0.713 / 0.720 (README)
    fm_prs: Literal["scores", "summary", "states"] = "states"
    # > 0: the FM heads also read the window's recent lab-value bins, one-hot, for this many of the
    # most measured codes with bins (model/value_bins.py; none when the tokenizer binned no values):
    # the hybrid that gives a linear head the lab thresholds the pooled states hold only entangled.
    # 0: the states alone. Default 40, measured on both cohorts (README, #21): cross-fitted fm_lr
    # (fm_prs=states) 0.768 -> 0.790 (20k) and 0.771 -> 0.799 (test bed); few-shot above counts
    # boosting at every k <= 64 on both, which the states alone miss at k = 64 on the test bed
    fm_value_codes: int = Field(40, ge=0)
    fm_value_recency_days: list[int] = Field(default_factory=lambda: [30, 365])  # and "anywhere in the window"
    # the bins as one_hot columns or cumulative ones ("measured", "bin >= 1", ...): the same
    # functions for a linear head, but the penalty falls on steps between neighbouring bins
    fm_value_encoding: ValueEncoding = "one_hot"
    # > 1: also fit every head on K person folds of all label rows, each row scored out of fold
    # (evaluate/cross_fit.py); 0: off
    cross_fit_folds: int = Field(0, ge=0)
    n_boot: int = Field(1000, ge=100)  # bootstrap resamples of the cross-fit CIs
    # zero_shot.parquet files (or their directories) of `ehrfm zero_shot` runs that together score
    # every label row (`splits=[train, val, test]`, or one run per split): the path probability
    # joins the cross-fit as a head that fits nothing, and the zero-shot target is judged on all rows
    zero_shot: list[Path] = Field(default_factory=list)
    threads: int | None = None  # BLAS/OpenMP threads while fitting (None: the libraries' default)

    @field_validator("shots")
    @classmethod
    def _positive_shots(cls, shots: list[int]) -> list[int]:
        if shots and min(shots) < 1:
            raise ValueError(f"shots must be >= 1, got {shots}")
        return sorted(set(shots))

    @model_validator(mode="after")
    def _something_to_do(self) -> FewShotConfig:
        if self.cross_fit_folds == 1:
            raise ValueError("cross_fit_folds must be 0 (off) or at least 2")
        if self.zero_shot and not self.cross_fit_folds:
            raise ValueError("zero_shot scores are compared on the cross-fit: set cross_fit_folds >= 2")
        if self.lr_cv_folds == 1:
            raise ValueError("lr_cv_folds must be 0 (fixed lr_c) or at least 2")
        if not self.lr_cs or min(self.lr_cs) <= 0:
            raise ValueError(f"lr_cs must be positive values, got {self.lr_cs}")
        if not self.shots and not self.cross_fit_folds:
            raise ValueError("shots is empty and cross_fit_folds is 0: nothing to evaluate")
        if self.history_windows > 1 and self.fm_inputs == "last":
            raise ValueError("history_windows > 1 reaches the FM head only through fm_inputs=last+mean")
        return self

    @field_validator("models")
    @classmethod
    def _known_models(cls, models: list[str]) -> list[str]:
        unknown = set(models) - set(MODELS)
        if unknown:
            raise ValueError(f"unknown models {sorted(unknown)}; choose from {MODELS}")
        return list(models)


class NotEnoughShots(ValueError):
    """The train split has fewer than k rows of a class: the draw is impossible, not shrunk."""


@dataclass(frozen=True)
class Design:
    """One head's inputs for every label row: `kind` says how it is fit."""

    kind: Literal["lr", "hgb"]
    x: np.ndarray | sp.csr_matrix
    # trailing columns an LR head reads as they are (0/1 indicators such as the value-bin readout):
    # standardising a rare indicator would multiply it by up to 1/sqrt(p) and let it overfit
    unscaled: int = 0

    def __post_init__(self) -> None:
        if self.unscaled and (sp.issparse(self.x) or not 0 < self.unscaled <= self.x.shape[1]):
            raise ValueError(f"unscaled={self.unscaled} needs a dense design with at least that many columns")


@dataclass(frozen=True)
class Ensemble:
    """Heads fit apart on the same rows whose risks are combined as the mean of their logits."""

    members: tuple[Design, ...]

    def __post_init__(self) -> None:
        if len(self.members) < 2:
            raise ValueError("an ensemble needs at least two member heads")


Head = Design | Ensemble  # what a model name maps to in run_few_shot and the cross-fit


# ---- draws --------------------------------------------------------------------------------------
def draw_shots(y: np.ndarray, split: np.ndarray, k: int, replicate: int, seed: int) -> np.ndarray:
    """Row indices of k positive then k negative train rows, a pure function of (seed, k, replicate)."""
    y = np.asarray(y).astype(bool)
    train = np.asarray(split) == TRAIN
    positives, negatives = np.flatnonzero(train & y), np.flatnonzero(train & ~y)
    for name, rows in (("positive", positives), ("negative", negatives)):
        if len(rows) < k:
            raise NotEnoughShots(f"the train split has fewer than k={k} {name} rows")
    rng = np.random.default_rng(np.random.SeedSequence([seed, k, replicate]))
    return np.concatenate([rng.choice(positives, k, replace=False), rng.choice(negatives, k, replace=False)])


# ---- heads --------------------------------------------------------------------------------------
def hgb_min_samples_leaf(rows: int, config: FewShotConfig) -> int:
    """The leaf size for `rows` training rows: small enough that two rows can split."""
    if config.hgb_min_samples_leaf is not None:
        return config.hgb_min_samples_leaf
    return min(20, max(1, rows // 10))


HGB_EARLY_STOPPING_ROWS = 10_000  # scikit-learn's `early_stopping="auto"` threshold


def hgb_early_stopping(rows: int, config: FewShotConfig) -> bool:
    """Whether boosting on `rows` fit rows holds out a validation tenth to stop on: the few shots
    are too few to spare one, the cross-fit's folds (tens of thousands of rows) overfit without."""
    if config.hgb_early_stopping == "auto":
        return rows > HGB_EARLY_STOPPING_ROWS
    return config.hgb_early_stopping == "on"


def logistic_head(y_fit: np.ndarray, config: FewShotConfig) -> LogisticRegression | LogisticRegressionCV:
    """L2 logistic regression with C = lr_c, or with C chosen from lr_cs by stratified folds of the
    fit rows when lr_cv_folds is set and each class has a row per fold."""
    folds = config.lr_cv_folds
    if folds >= 2 and np.bincount(y_fit, minlength=2).min() >= folds:
        return LogisticRegressionCV(
            Cs=list(config.lr_cs),
            cv=StratifiedKFold(folds, shuffle=True, random_state=config.seed),
            scoring="roc_auc",
            max_iter=config.lr_max_iter,
            l1_ratios=(0.0,),  # L2, as the fixed-C head
            use_legacy_attributes=False,
        )
    return LogisticRegression(C=config.lr_c, max_iter=config.lr_max_iter)


def fit_and_score(
    design: Head,
    y: np.ndarray,
    fit_rows: np.ndarray,
    score_rows: np.ndarray,
    config: FewShotConfig,
    scale_rows: np.ndarray | None = None,
    fitted: dict[int, np.ndarray] | None = None,
):
    """Fit one head on `fit_rows` only (labels and all); its risk on `score_rows`. `scale_rows`: the
    rows whose features (never labels) fit an LR head's scaling, default `fit_rows`. `fitted`: the
    risks already computed on these rows, by design (id), so that an ensemble member that is also a
    head of its own (fm_lr, fm_hgb beside fm_ens) is fit once per fold or draw."""
    if isinstance(design, Ensemble):
        return mean_logit(
            [fit_and_score(m, y, fit_rows, score_rows, config, scale_rows, fitted) for m in design.members]
        )
    if fitted is not None and id(design) in fitted:
        return fitted[id(design)]
    risk = _fit_design(design, y, fit_rows, score_rows, config, scale_rows)
    if fitted is not None:
        fitted[id(design)] = risk
    return risk


def mean_logit(risks: list[np.ndarray]) -> np.ndarray:
    """Risks combined as the mean of their logits (an ensemble's members, a bag of boosting fits)."""
    return expit(np.mean([logit(r) for r in risks], axis=0))


def _fit_design(design: Design, y, fit_rows, score_rows, config: FewShotConfig, scale_rows) -> np.ndarray:
    x_fit, y_fit, x_score = design.x[fit_rows], np.asarray(y)[fit_rows].astype(int), design.x[score_rows]
    # every fit, not only run_few_shot's loop: OpenMP threads that spin beside other work cost 10x
    with threadpool_limits(limits=config.threads):
        if design.kind == "lr":
            scaled = design.x.shape[1] - design.unscaled
            scaler = MaxAbsScaler() if sp.issparse(design.x) else StandardScaler()
            scaler.fit((x_fit if scale_rows is None else design.x[scale_rows])[:, :scaled])

            def prepared(x):
                if not design.unscaled:
                    return scaler.transform(x)
                return np.column_stack([scaler.transform(x[:, :scaled]), x[:, scaled:]])

            model = logistic_head(y_fit, config)
            model.fit(prepared(x_fit), y_fit)
            return model.predict_proba(prepared(x_score))[:, 1]
        # a column unmeasured (NaN) in every shot is constant to the fit and breaks scikit-learn's binning
        measured = ~np.isnan(x_fit).all(axis=0)
        x_fit, x_score = x_fit[:, measured], x_score[:, measured]
        stops_early = hgb_early_stopping(len(fit_rows), config)
        risks = []
        for bag in range(config.hgb_bags if stops_early else 1):  # without a validation draw the fits are equal
            model = HistGradientBoostingClassifier(
                learning_rate=config.hgb_learning_rate,
                max_iter=config.hgb_max_iter,
                min_samples_leaf=hgb_min_samples_leaf(len(fit_rows), config),
                early_stopping=stops_early,
                random_state=config.seed + bag,
            )
            model.fit(x_fit, y_fit)
            risks.append(model.predict_proba(x_score)[:, 1])
        return risks[0] if len(risks) == 1 else mean_logit(risks)


def fm_design(
    hidden: np.ndarray,
    prs: np.ndarray | None,
    has_prs: np.ndarray | None,
    mean: np.ndarray | None = None,
    prs_summary: np.ndarray | None = None,
    value_bins: np.ndarray | None = None,
) -> Design:
    """The FM head's inputs: frozen last-token states (and the mean state, and the decoder's PRS
    summary, when given) beside the PRS columns and has-PRS flag (when `prs` is given), and last the
    window's value-bin one-hots (when given), which the LR head reads unscaled."""
    x = np.asarray(hidden, dtype=np.float64)
    for extra in (mean, prs_summary):
        if extra is not None:
            x = np.column_stack([x, np.asarray(extra, dtype=np.float64)])
    if prs is not None:
        x = np.column_stack([x, prs_design(prs, has_prs)])
    if value_bins is None or value_bins.shape[1] == 0:
        return Design("lr", x)
    return Design("lr", np.column_stack([x, np.asarray(value_bins, dtype=np.float64)]), unscaled=value_bins.shape[1])


def fm_boosted_design(lr_inputs: Design, bin_numbers: np.ndarray | None) -> Design:
    """fm_hgb's inputs: fm_lr's columns, with the value-bin readout (its trailing unscaled columns)
    replaced by each slot's bin number (`ValueBinReadout.bin_numbers`, NaN where unmeasured)."""
    x = np.asarray(lr_inputs.x)
    states = x[:, : x.shape[1] - lr_inputs.unscaled]
    if bin_numbers is None or bin_numbers.shape[1] == 0:
        if lr_inputs.unscaled:
            raise ValueError("fm_lr's inputs hold value-bin columns: give their bin numbers")
        return Design("hgb", states)
    return Design("hgb", np.column_stack([states, np.asarray(bin_numbers, dtype=np.float64)]))


def count_designs(
    features: FeatureMatrix,
    prs: np.ndarray | None,
    has_prs: np.ndarray | None,
    split: np.ndarray,
    config: FewShotConfig,
    fm_states: np.ndarray | None = None,
) -> dict[str, Design]:
    """The count heads' inputs, built as the baselines build theirs (PRS heads only with a PRS),
    values_hgb's (the dense last-value and age columns alone), and fm_counts_hgb's (the dense counts
    beside `fm_states`, fm_lr's inputs with their PRS columns)."""
    prs_cols = None if prs is None else prs_design(prs, has_prs)
    wanted = [m for m in COUNT_MODELS if m in config.models and (prs_cols is not None or "_prs_" not in m)]
    with_fm = FM_COUNTS_HGB in config.models and fm_states is not None
    out: dict[str, Design] = {}
    if any(m.endswith("_lr") for m in wanted):
        out["counts_lr"] = Design("lr", lr_design(features, None))
        if prs_cols is not None:
            out["counts_prs_lr"] = Design("lr", lr_design(features, prs_cols))
    if with_fm or any(m.endswith("_hgb") for m in wanted):
        columns = dense_columns(features, np.asarray(split) == TRAIN, config.features.hgb_max_dense_features)
        dense = features.to_dense(columns)
        out["counts_hgb"] = Design("hgb", dense)
        if VALUES_HGB in wanted:  # a copy of the value columns: only when asked for
            out[VALUES_HGB] = Design("hgb", dense[:, features.value_columns[columns]])
        if prs_cols is not None:
            out["counts_prs_hgb"] = Design("hgb", np.column_stack([dense, prs_cols.astype(np.float32)]))
        if with_fm:
            out[FM_COUNTS_HGB] = Design("hgb", np.column_stack([dense, np.asarray(fm_states, dtype=np.float32)]))
    return {name: design for name, design in out.items() if name in wanted or name == FM_COUNTS_HGB}


# ---- the protocol -------------------------------------------------------------------------------
def _record(model: str, k: int, replicate: int, scores: dict | None = None, reason: str | None = None) -> dict:
    scores = scores or dict.fromkeys(METRICS, math.nan)
    return {"model": model, "k": k, "replicate": replicate, **scores, "reason": reason}


def run_few_shot(designs: Mapping[str, Head], y, split, config: FewShotConfig) -> list[dict]:
    """One record per (model, k, replicate): test AUROC/AUPRC, or NaN and the reason it has none."""
    y = np.asarray(y).astype(int).ravel()
    split = np.asarray(split).astype(str).ravel()
    test = np.flatnonzero(split == TEST)
    if not config.shots:  # cross-fit only: the test split is not scored
        return []
    if not 0 < y[test].sum() < len(test):
        raise ValueError("the test split needs rows of both classes to score a head")
    scale_rows = np.flatnonzero(split == TRAIN) if config.scale_on == "train" else None
    records = []
    with threadpool_limits(limits=config.threads):
        for k in config.shots:
            for replicate in range(config.replicates):
                try:
                    rows = draw_shots(y, split, k, replicate, config.seed)
                except NotEnoughShots as err:
                    records += [_record(name, k, replicate, reason=str(err)) for name in designs]
                    continue
                fitted: dict[int, np.ndarray] = {}  # members shared by heads are fit once per draw
                for name, design in designs.items():
                    try:
                        risk = fit_and_score(design, y, rows, test, config, scale_rows, fitted)
                    except ValueError as err:  # scikit-learn's refusals of a fit
                        records.append(_record(name, k, replicate, reason=f"{type(err).__name__}: {err}"))
                        continue
                    scores = {"auroc": auroc(y[test], risk), "auprc": auprc(y[test], risk)}
                    records.append(_record(name, k, replicate, scores))
    return records


def summarize(records: list[dict]) -> list[dict]:
    """Per (model, k): mean, SD (n - 1), min and max of each metric over the fitted replicates."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for record in records:
        groups.setdefault((record["model"], record["k"]), []).append(record)
    rows = []
    for (model, k), group in groups.items():
        row = {"model": model, "k": k, "replicates": len(group)}
        fitted = [r for r in group if math.isfinite(r["auroc"])]
        row["replicates_fit"] = len(fitted)
        for metric in METRICS:
            values = np.array([r[metric] for r in fitted], dtype=np.float64)
            row[f"{metric}_mean"] = float(values.mean()) if values.size else math.nan
            row[f"{metric}_sd"] = float(values.std(ddof=1)) if values.size > 1 else math.nan
            row[f"{metric}_min"] = float(values.min()) if values.size else math.nan
            row[f"{metric}_max"] = float(values.max()) if values.size else math.nan
        reasons = sorted({r["reason"] for r in group if r["reason"]})
        row["reason"] = "; ".join(reasons) or None
        rows.append(row)
    order = {m: i for i, m in enumerate(MODELS)}
    return sorted(rows, key=lambda r: (order.get(r["model"], len(order)), r["model"], r["k"]))


def paired_differences(records: list[dict], head: str = FM_LR, metric: str = "auroc") -> list[dict]:
    """Per (count head, k): `head` minus that head over the draws both were fit on. Every head of a
    (k, replicate) reads the same shots, so the paired difference's spread is the draws' effect on
    the difference, far below either AUROC's own spread (which mixes in how easy each draw was).
    SE = SD / sqrt(draws); `wins` counts the draws where `head` scored higher."""
    score = {(r["model"], r["k"], r["replicate"]): r[metric] for r in records if math.isfinite(r[metric])}
    rows = []
    for baseline in (m for m in COUNT_MODELS if any(r["model"] == m for r in records)):
        for k in sorted({r["k"] for r in records}):
            pairs = [
                score[(head, k, rep)] - score[(baseline, k, rep)]
                for (model, kk, rep) in score
                if model == head and kk == k and (baseline, k, rep) in score
            ]
            if not pairs:
                continue
            values = np.array(pairs)
            sd = float(values.std(ddof=1)) if values.size > 1 else math.nan
            rows.append(
                {
                    "head": head,
                    "baseline": baseline,
                    "k": k,
                    "draws": int(values.size),
                    f"{metric}_difference_mean": float(values.mean()),
                    f"{metric}_difference_se": sd / math.sqrt(values.size) if values.size > 1 else math.nan,
                    "wins": int((values > 0).sum()),
                }
            )
    return rows
