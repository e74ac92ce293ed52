"""`ehrfm prs_headroom`: how much could the PRS people actually have add to this task at all?

The fine-tuned model's PRS gain is judged on a few dozen test events, so on its own it cannot
say whether a small gain is the model's fault or the data's. This answers the data's side on
every label row, with cross-fitting and no foundation model involved:

- oracle headroom (synthetic cohorts): AUROC of the true risk with the true genetic liability,
  minus with only the ancestry-group mean. Genetics the scores cannot see is included, so this
  is an upper bound.
- oracle + observed score (synthetic cohorts): a logistic regression on the no-genetics oracle's
  logit, with and without the trait's observed PGS and the has-PRS flag: what a model that knew
  everything clinical could still gain from the score as measured.
- gradient boosting (any cohort): the count features of the baselines, with and without that
  one PGS column (NaN where a person has no PRS), K-fold cross-validated over several seeds.
Prints a table; `--out` writes the numbers as JSON (aggregates only, no person rows).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from ehrfm.config import add_config_arguments, parse_config
from ehrfm.evaluate.baselines import (
    BaselineConfig,
    boosting_model,
    dense_columns,
    prs_for,
    read_events,
    read_parquet_parts,
)
from ehrfm.evaluate.features import CodeVocabulary, build_features
from ehrfm.evaluate.oracle import ORACLE_GENETIC, ORACLE_GROUP_MEAN, oracle_scores, pgs_column, trait_pgs
from ehrfm.evaluate.truth import load_truth
from ehrfm.transfer.examples import read_labels


def _cross_fitted_auroc(x: np.ndarray, y: np.ndarray, make_model, folds: int, seed: int) -> float:
    """AUROC of out-of-fold predictions (every row scored by a model that never saw it)."""
    out = np.zeros(len(y))
    for train, held_out in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        out[held_out] = make_model().fit(x[train], y[train]).predict_proba(x[held_out])[:, 1]
    return float(roc_auc_score(y, out))


def _with_and_without(
    base: np.ndarray, extra: np.ndarray, y: np.ndarray, make_model, folds: int, seeds: tuple[int, ...]
) -> dict:
    without = [_cross_fitted_auroc(base, y, make_model, folds, s) for s in seeds]
    with_score = [_cross_fitted_auroc(np.column_stack([base, extra]), y, make_model, folds, s) for s in seeds]
    return {
        "without": float(np.mean(without)),
        "with": float(np.mean(with_score)),
        "gain": float(np.mean(with_score) - np.mean(without)),
        "gain_per_seed": [float(a - b) for a, b in zip(with_score, without)],
    }


def prs_headroom(
    data_dir: Path,
    labels_path: Path,
    cohort: Path | None = None,
    pgs_id: str | None = None,
    folds: int = 5,
    seeds: tuple[int, ...] = (0, 1),
    horizon_days: int = 730,
    config: BaselineConfig | None = None,
) -> dict:
    config = config or BaselineConfig()
    data_dir = Path(data_dir)
    labels = read_labels(labels_path)
    y = labels["boolean_value"].to_numpy(zero_copy_only=False).astype(int)
    if y.sum() < folds or (len(y) - y.sum()) < folds:
        raise ValueError(f"{labels_path}: {int(y.sum())} positives of {len(y)} rows: too few for {folds} folds")
    if pgs_id is None and cohort is not None:
        pgs_id = trait_pgs(cohort)
    prs_dir = data_dir / "prs"
    column = pgs_column(prs_dir, pgs_id)
    prs, has = prs_for(labels, read_parquet_parts(prs_dir), [column])
    score = np.where(has, prs[:, 0], np.nan)
    result = {
        "rows": len(y),
        "events": int(y.sum()),
        "genotyped_share": float(has.mean()),
        "pgs_id": pgs_id,
        "folds": folds,
        "seeds": list(seeds),
        "pgs_auroc_genotyped": float(roc_auc_score(y[has], score[has])) if 0 < y[has].sum() < has.sum() else None,
    }

    with threadpool_limits(limits=config.threads):
        events = read_events(data_dir)
        vocabulary = CodeVocabulary.fit(
            events, labels, tuple(config.windows_days), config.min_persons_per_code, config.max_codes
        )  # label-free: which codes are common enough
        features = build_features(events, labels, vocabulary)
        counts = features.to_dense(dense_columns(features, np.ones(len(y), bool), config.hgb_max_dense_features))
        # early stopping on an internal split of each training fold (the folds have no validation split)
        result["hgb_counts"] = _with_and_without(
            counts, score[:, None], y, lambda: boosting_model(config, True), folds, seeds
        )
        if cohort is not None:
            oracle = oracle_scores(load_truth(cohort), labels, horizon_days, str(cohort))
            genetic, group_mean = oracle.risks[ORACLE_GENETIC], oracle.risks[ORACLE_GROUP_MEAN]
            result["oracle"] = {
                "genetic": float(roc_auc_score(y, genetic)),
                "group_mean": float(roc_auc_score(y, group_mean)),
                "headroom": float(roc_auc_score(y, genetic) - roc_auc_score(y, group_mean)),
                "rows_already_begun": int(oracle.already_begun.sum()),
            }
            p = np.clip(group_mean, 1e-6, 1 - 1e-6)
            clinical = np.log(p / (1 - p))[:, None]
            observed = np.column_stack([np.nan_to_num(score - np.nanmean(score)), has])
            result["oracle_plus_score"] = _with_and_without(
                clinical, observed, y, lambda: LogisticRegression(max_iter=1000), folds, seeds
            )
    return result


def headroom_markdown(result: dict) -> str:
    lines = [
        f"# PRS headroom: {result['rows']} label rows ({result['events']} events), "
        f"{result['genotyped_share']:.0%} genotyped, score {result['pgs_id'] or 'column 0'}",
        "",
        "| measure | AUROC without | AUROC with | gain |",
        "|---|---|---|---|",
    ]
    if "oracle" in result:
        o = result["oracle"]
        lines.append(
            f"| oracle: ancestry mean → true genetic liability | {o['group_mean']:.3f} | {o['genetic']:.3f} | "
            f"{o['headroom']:+.3f} |"
        )
        o = result["oracle_plus_score"]
        lines.append(
            f"| oracle without genetics + the observed score (cross-fitted LR) | {o['without']:.3f} | "
            f"{o['with']:.3f} | {o['gain']:+.3f} |"
        )
    h = result["hgb_counts"]
    lines.append(
        f"| gradient boosting on counts + the observed score ({result['folds']}-fold CV, "
        f"{len(result['seeds'])} seeds) | {h['without']:.3f} | {h['with']:.3f} | {h['gain']:+.3f} |"
    )
    if result["pgs_auroc_genotyped"] is not None:
        lines += ["", f"The score alone on the genotyped rows: AUROC {result['pgs_auroc_genotyped']:.3f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ehrfm prs_headroom", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="preprocessed dir (MEDS): data/, prs/")
    parser.add_argument("--labels", type=Path, required=True, help="labels.parquet from `ehrfm label`")
    parser.add_argument(
        "--cohort", type=Path, default=None, help="synthetic cohort dir with truth/ (adds the oracle rows)"
    )
    parser.add_argument(
        "--pgs-id", default=None, help="the trait's PGS (default: the truth's best T2D score, else column 0)"
    )
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--horizon-days", type=int, default=730)
    add_config_arguments(parser, "BaselineConfig (features, HGB)", flag="--baseline-config")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers here as JSON")
    args = parser.parse_args(argv)
    config = parse_config(parser, BaselineConfig, args, config="baseline_config")
    result = prs_headroom(
        args.data, args.labels, args.cohort, args.pgs_id, args.folds, tuple(args.seeds), args.horizon_days, config
    )
    print(headroom_markdown(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
