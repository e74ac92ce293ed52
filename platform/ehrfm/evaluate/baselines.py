"""Baselines on the same labels and splits as the foundation model.

- prs_lr: logistic regression on the PRS vector (+ a has-PRS indicator).
- counts_lr / counts_prs_lr: L2 logistic regression on log1p code counts and last values
  (sparse, max-abs scaled), without / with the PRS columns; C picked on the validation split.
- counts_hgb / counts_prs_hgb: scikit-learn HistGradientBoosting on the most frequent feature
  columns (dense; unmeasured values NaN), early-stopped on the validation split.
Each returns a risk for every label row; evaluation reads the test rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from pydantic import Field
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import MaxAbsScaler
from threadpoolctl import threadpool_limits

from ehrfm.calibration import Recalibrator
from ehrfm.config import StrictModel, add_config_arguments, parse_config
from ehrfm.evaluate.features import CodeVocabulary, FeatureMatrix, build_features, demographics
from ehrfm.evaluate.report import evaluate_predictions, log_to_mlflow, write_report, write_stratified
from ehrfm.evaluate.stratify import age_bucket
from ehrfm.meds.layout import DATA_DIR
from ehrfm.meds.writer import read_events as read_dataset_events
from ehrfm.metrics import auroc
from ehrfm.prs.person import stored_width

BASELINES = ("prs_lr", "counts_lr", "counts_prs_lr", "counts_hgb", "counts_prs_hgb")
TRAIN, VAL, TEST = "train", "val", "test"
EVENT_COLUMNS = ("subject_id", "time", "code", "numeric_value")


class BaselineConfig(StrictModel):
    """Feature windows and model settings (defaults suit thousands of codes on a laptop)."""

    windows_days: list[int | None] = Field(default_factory=lambda: [30, 365, None])
    min_persons_per_code: int = 5
    max_codes: int | None = 5000
    lr_c_grid: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0])
    lr_max_iter: int = 2000
    hgb_max_iter: int = 300
    hgb_learning_rate: float = 0.05
    hgb_max_dense_features: int = 2000
    threads: int | None = None  # BLAS/OpenMP threads while fitting (None: the libraries' default)
    seed: int = 0


def prs_design(prs: np.ndarray, has_prs: np.ndarray) -> np.ndarray:
    """PRS columns (0 where missing) + a has-PRS indicator, so a missing PRS is never mistaken for 0."""
    values = np.nan_to_num(np.asarray(prs, dtype=np.float64).reshape(len(has_prs), -1))
    values[~np.asarray(has_prs, dtype=bool)] = 0.0
    return np.column_stack([values, np.asarray(has_prs, dtype=np.float64)])


def lr_design(features: FeatureMatrix, prs_cols: np.ndarray | None) -> sp.csr_matrix:
    """The logistic-regression baselines' design: log1p counts, last values as they are, + PRS columns."""
    matrix = features.matrix.tocsr(copy=True)
    counts = ~features.value_columns[matrix.indices]
    matrix.data[counts] = np.log1p(matrix.data[counts])
    if prs_cols is not None:
        matrix = sp.hstack([matrix, sp.csr_matrix(prs_cols)], format="csr")
    return matrix


def _both_classes(y: np.ndarray) -> bool:
    return y.size > 0 and 0 < int(y.sum()) < y.size


def fit_logistic(x, y: np.ndarray, split: np.ndarray, config: BaselineConfig) -> np.ndarray:
    """Scaled L2 logistic regression; C with the best validation AUROC (first grid value without val)."""
    train, val = split == TRAIN, split == VAL
    if not _both_classes(y[train]):
        raise ValueError(f"training split needs both classes: {int(y[train].sum())} positives of {int(train.sum())}")
    scaler = MaxAbsScaler().fit(x[train])
    xs = scaler.transform(x)
    best, best_auc = None, -np.inf
    grid = config.lr_c_grid if _both_classes(y[val]) else config.lr_c_grid[-1:]
    for c in grid:
        model = LogisticRegression(C=c, max_iter=config.lr_max_iter).fit(xs[train], y[train])
        score = auroc(y[val], model.predict_proba(xs[val])[:, 1]) if len(grid) > 1 else 0.0
        if score > best_auc:
            best, best_auc = model, score
    return best.predict_proba(xs)[:, 1]


def dense_columns(features: FeatureMatrix, train: np.ndarray, limit: int) -> np.ndarray:
    """The `limit` columns non-zero in most training rows (ties by position), in column order."""
    nonzero = np.asarray((features.matrix[train] != 0).sum(axis=0)).ravel()
    keep = np.argsort(-nonzero, kind="stable")[:limit]
    return np.sort(keep[nonzero[keep] > 0])


def boosting_model(config: BaselineConfig, early_stopping: bool) -> HistGradientBoostingClassifier:
    """The gradient-boosting baseline's estimator, unfitted (also cross-validated by `prs_headroom`)."""
    return HistGradientBoostingClassifier(
        learning_rate=config.hgb_learning_rate,
        max_iter=config.hgb_max_iter,
        early_stopping=early_stopping,
        random_state=config.seed,
    )


def fit_boosting(x: np.ndarray, y: np.ndarray, split: np.ndarray, config: BaselineConfig) -> np.ndarray:
    """HistGradientBoosting; early stopping on the validation split when it has both classes."""
    train, val = split == TRAIN, split == VAL
    if not _both_classes(y[train]):
        raise ValueError(f"training split needs both classes: {int(y[train].sum())} positives of {int(train.sum())}")
    use_val = _both_classes(y[val])
    model = boosting_model(config, use_val)
    if use_val:
        model.fit(x[train], y[train], X_val=x[val], y_val=y[val])
    else:
        model.fit(x[train], y[train])
    return model.predict_proba(x)[:, 1]


def run_baselines(
    y,
    split,
    features: FeatureMatrix | None = None,
    prs: np.ndarray | None = None,
    has_prs: np.ndarray | None = None,
    config: BaselineConfig | None = None,
    names: tuple[str, ...] = BASELINES,
) -> dict[str, np.ndarray]:
    """Fit each named baseline on the train rows; risks for all rows. Skips those lacking inputs."""
    config = config or BaselineConfig()
    y = np.asarray(y).astype(int).ravel()
    split = np.asarray(split).astype(str).ravel()
    unknown = set(names) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}; choose from {BASELINES}")
    prs_cols = None
    if prs is not None:
        prs_cols = prs_design(prs, np.ones(y.size, bool) if has_prs is None else has_prs)
    with threadpool_limits(limits=config.threads):
        return _fit_each(y, split, features, prs_cols, config, names)


def _fit_each(
    y: np.ndarray,
    split: np.ndarray,
    features: FeatureMatrix | None,
    prs_cols: np.ndarray | None,
    config: BaselineConfig,
    names: tuple[str, ...],
) -> dict[str, np.ndarray]:
    results: dict[str, np.ndarray] = {}
    for name in names:
        wants_prs = name == "prs_lr" or "_prs_" in name
        wants_counts = name.startswith("counts")
        if (wants_prs and prs_cols is None) or (wants_counts and features is None):
            continue
        if name == "prs_lr":
            results[name] = fit_logistic(prs_cols, y, split, config)
        elif name.endswith("_lr"):
            results[name] = fit_logistic(lr_design(features, prs_cols if wants_prs else None), y, split, config)
        else:
            columns = dense_columns(features, split == TRAIN, config.hgb_max_dense_features)
            dense = features.to_dense(columns)
            if wants_prs:
                dense = np.column_stack([dense, prs_cols.astype(np.float32)])
            results[name] = fit_boosting(dense, y, split, config)
    return results


# ---- inputs from files ------------------------------------------------------------------------
def splits_for(labels: pa.Table, splits: pl.DataFrame, source: str = "splits") -> np.ndarray:
    """The split of each label row's subject; every labeled subject must have one."""
    lab = pl.from_arrow(labels).select(pl.col("subject_id").cast(pl.Int64))
    table = splits.select(pl.col("subject_id").cast(pl.Int64), pl.col("split").cast(pl.String)).unique("subject_id")
    joined = lab.join(table, on="subject_id", how="left", maintain_order="left")
    missing = joined["split"].null_count()
    if missing:
        raise ValueError(f"{source}: {missing} of {lab.height} labeled subjects have no split")
    return joined["split"].to_numpy()


def prs_for(labels: pa.Table, prs_table: pa.Table, columns: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(PRS [n, K] float32, has_prs [n]) per label row from a prs/ table; absent persons lack a PRS."""
    frame = pl.from_arrow(prs_table.select(["subject_id", "prs", "has_prs"]))
    lab = pl.from_arrow(labels).select(pl.col("subject_id").cast(pl.Int64))
    joined = lab.join(frame, on="subject_id", how="left", maintain_order="left")
    width = stored_width(prs_table.schema.field("prs").type)
    values = np.zeros((lab.height, width), dtype=np.float32)
    has = joined["has_prs"].fill_null(False).to_numpy()
    present = joined["prs"].is_not_null().to_numpy()
    if present.any():
        values[present] = np.stack(joined.filter(pl.col("prs").is_not_null())["prs"].to_numpy())
    values = values if columns is None else values[:, columns]
    return values, has


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ehrfm baselines", description="fit and evaluate the baselines for one task")
    parser.add_argument("--events", type=Path, required=True, help="directory of MEDS event shards")
    parser.add_argument("--labels", type=Path, required=True, help="labels.parquet from `ehrfm label`")
    parser.add_argument("--splits", type=Path, required=True, help="parquet file/dir with subject_id, split")
    parser.add_argument("--prs", type=Path, default=None, help="prs/ parquet (subject_id, prs, has_prs)")
    parser.add_argument("--prs-columns", type=int, nargs="*", default=None, help="PGS column indices to use")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument(
        "--recalibrate",
        choices=["platt", "isotonic"],
        default=None,
        help="also report each model recalibrated on the validation split",
    )
    parser.add_argument("--ancestry", type=Path, default=None, help="parquet with subject_id, ancestry")
    add_config_arguments(parser, "BaselineConfig")
    args = parser.parse_args(argv)
    config = parse_config(parser, BaselineConfig, args)
    labels = pq.read_table(args.labels)
    events = read_events(args.events)
    split = splits_for(labels, pl.read_parquet(args.splits, columns=["subject_id", "split"]), args.splits.name)
    prs = has_prs = None
    if args.prs is not None:
        prs, has_prs = prs_for(labels, read_parquet_parts(args.prs), args.prs_columns)
    y = labels["boolean_value"].to_numpy(zero_copy_only=False).astype(int)
    risks = baseline_risks(events, labels, split, prs, has_prs, config)
    if args.recalibrate:
        risks |= recalibrated(risks, y, split, args.recalibrate)
    groups = subgroups(events, labels, has_prs, args.ancestry)
    test = split == TEST
    test_risks = {name: risk[test] for name, risk in risks.items()}
    persons = labels["subject_id"].to_numpy(zero_copy_only=False)[test]  # resampled with all their rows
    results = [
        evaluate_predictions(name, y[test], risk, n_boot=args.n_boot, seed=config.seed, groups=persons)
        for name, risk in test_risks.items()
    ]
    prs_test = None if prs is None else np.where(has_prs[test], prs[test, 0], np.nan)
    paths = write_report(results, args.out, y[test], test_risks, prs_test)
    paths += write_stratified(
        args.out,
        y[test],
        test_risks,
        {k: v[test] for k, v in groups.items()},
        prs_test,
        seed=config.seed,
        persons=persons,
    )
    log_to_mlflow(results, paths)
    print(json.dumps({r.name: {"auroc": r.auroc.value, "auprc": r.auprc.value} for r in results}, indent=2))
    return 0


def read_events(path: Path) -> pa.Table:
    """The event columns the count features need: from a preprocessed MEDS dataset root (static codes
    placed at birth, `ehrfm.meds.writer.read_events`), a MEDS events file or a directory of shards."""
    path = Path(path)
    if (path / DATA_DIR).is_dir() or (path / "events").is_dir():  # a dataset root (old layout: clear error)
        return read_dataset_events(path, list(EVENT_COLUMNS))
    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no event parquet at {path}")
    return pa.concat_tables(
        [pq.read_table(f, columns=list(EVENT_COLUMNS)) for f in files], promote_options="permissive"
    )


def baseline_risks(
    events: pa.Table,
    labels: pa.Table,
    split: np.ndarray,
    prs: np.ndarray | None,
    has_prs: np.ndarray | None,
    config: BaselineConfig | None = None,
    names: tuple[str, ...] = BASELINES,
) -> dict[str, np.ndarray]:
    """Every baseline's risk for every label row: code vocabulary fit on the train rows, then the fits."""
    config = config or BaselineConfig()
    train_labels = labels.filter(pa.array(np.asarray(split) == TRAIN))
    vocab = CodeVocabulary.fit(
        events, train_labels, tuple(config.windows_days), config.min_persons_per_code, config.max_codes
    )
    features = build_features(events, labels, vocab)
    y = labels["boolean_value"].to_numpy(zero_copy_only=False).astype(int)
    return run_baselines(y, split, features, prs, has_prs, config, names)


def read_parquet_parts(path: Path, columns: list[str] | None = None) -> pa.Table:
    """A parquet file, or a stage output directory's `part-*.parquet` files (its JSON sidecars skipped)."""
    path = Path(path)
    if path.is_file():
        return pq.read_table(path, columns=columns)
    parts = sorted(path.glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no part-*.parquet files in {path}")
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in parts])


def recalibrated(
    risks: dict[str, np.ndarray], y: np.ndarray, split: np.ndarray, method: str, refused: dict | None = None
) -> dict[str, np.ndarray]:
    """Each model's risks mapped by a recalibrator fit on its validation-split risks.

    Risks may be NaN on rows a model did not score; a model without scored validation rows of
    both classes, or whose scores are not probabilities, has no recalibrated version; nor has one
    whose Platt fit is refused (score anti-correlated on validation): `refused[name]` gets why.
    """
    out = {}
    for name, risk in risks.items():
        scored = np.isfinite(risk)
        val = (split == VAL) & scored
        probabilities = scored.any() and risk[scored].min() >= 0 and risk[scored].max() <= 1
        if not (probabilities and _both_classes(y[val])):
            continue
        values = np.full(risk.shape, np.nan)
        recalibrator = Recalibrator(method).fit(y[val], risk[val])
        if recalibrator.refused is not None:
            if refused is not None:
                refused[name] = recalibrator.refused
            continue
        values[scored] = recalibrator.transform(risk[scored])
        out[f"{name} ({method})"] = values
    return out


def subgroups(
    events: pa.Table, labels: pa.Table, has_prs: np.ndarray | None, ancestry_path: Path | None
) -> dict[str, np.ndarray]:
    """Sex and age bucket from the events, has-PRS, and ancestry when a file gives it."""
    demo = demographics(events, labels)
    groups = {"sex": demo["sex"].to_numpy(), "age": age_bucket(demo["age_years"].to_numpy())}
    if has_prs is not None:
        groups["has_prs"] = np.where(has_prs, "PRS", "no PRS")
    if ancestry_path is not None:
        table = pl.read_parquet(ancestry_path, columns=["subject_id", "ancestry"])
        groups["ancestry"] = ancestry_of(demo["subject_id"].to_numpy(), table)
    return groups


def ancestry_of(subject_ids: np.ndarray, table: pl.DataFrame) -> np.ndarray:
    """Each subject's ancestry label from a (subject_id, ancestry) table; 'unknown' when absent."""
    subjects = pl.DataFrame({"subject_id": np.asarray(subject_ids, dtype=np.int64)})
    lookup = table.select(pl.col("subject_id").cast(pl.Int64), pl.col("ancestry").cast(pl.String))
    joined = subjects.join(lookup.unique("subject_id"), on="subject_id", how="left", maintain_order="left")
    return joined["ancestry"].fill_null("unknown").to_numpy()


if __name__ == "__main__":
    sys.exit(main())
