"""`ehrfm evaluate`: every model of one task scored on the same test label rows, side by side.

Models: the fine-tuned model and the same model with its PRS masked (predictions.parquet), the
default fine-tune when the headline model came out of a sweep (its own predictions.parquet), the
zero-shot trajectory scores (zero_shot.parquet), the baselines (fit here on the same labels and
splits), optional recalibrated versions (fit on validation rows), and on a synthetic cohort the
oracle from the generative truth. Each gets AUROC and AUPRC with bootstrap 95% CIs and ECE;
differences that decide the task (PRS gain, margin over the baselines, gap to the oracle) get a
paired bootstrap CI. Writes report.md, report.json, PNG figures and subgroup / PRS-decile tables,
and logs metrics and those files (aggregates only, no person rows) to MLflow when a tracking URI
is set.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from ehrfm.config import add_config_arguments, parse_config
from ehrfm.evaluate.alignment import align_scores
from ehrfm.evaluate.baselines import (
    BASELINES,
    TEST,
    BaselineConfig,
    ancestry_of,
    baseline_risks,
    prs_for,
    read_events,
    read_parquet_parts,
    recalibrated,
    splits_for,
    subgroups,
)
from ehrfm.evaluate.meds_dev import prediction_table, write_predictions
from ehrfm.evaluate.oracle import (
    ORACLE_GENETIC,
    ORACLE_GROUP_MEAN,
    oracle_scores,
    pgs_column,
    trait_pgs,
    truth_ancestry,
)
from ehrfm.evaluate.plots import save_figures
from ehrfm.evaluate.prs_use import prs_use
from ehrfm.evaluate.report import (
    ModelResult,
    evaluate_predictions,
    log_to_mlflow,
    markdown_table,
    metric_key,
    write_stratified,
)
from ehrfm.evaluate.targets import MIN_EVENTS_FOR_TARGET, MIN_PRS_GAIN_SHARE
from ehrfm.evaluate.truth import load_truth
from ehrfm.meds.layout import SPLITS_FILE, read_subject_splits
from ehrfm.metrics import DEFAULT_BOOTSTRAP, Estimate, bootstrap_difference
from ehrfm.small_counts import binary_hidden, public_json, show
from ehrfm.transfer.examples import read_labels

EXPERIMENT = "ehrfm-evaluate"
FINETUNED, FINETUNED_MASKED = "finetuned", "finetuned_prs_masked"
FINETUNED_DEFAULT = "finetuned_default"
HGB, HGB_PRS = "counts_hgb", "counts_prs_hgb"
ZS_PATH, ZS_SHARE = "zero_shot_path_probability", "zero_shot_share"
MIN_EVENTS_FOR_COMPARISON = 20  # below this many test events a table of AUROCs is anecdote
MODEL_NOTES = {
    FINETUNED: "fine-tuned foundation model (Platt-calibrated on validation, raw where that was refused)",
    FINETUNED_MASKED: "same weights, every person's PRS masked",
    FINETUNED_DEFAULT: "the default fine-tune (the configuration a sweep starts from)",
    ZS_PATH: "zero-shot: probability of the target along sampled trajectories",
    ZS_SHARE: "zero-shot: share of sampled trajectories reaching the target",
    "prs_lr": "logistic regression on the PRS vector",
    "counts_lr": "logistic regression on code counts",
    "counts_prs_lr": "same + PRS",
    "counts_hgb": "gradient boosting on code counts",
    "counts_prs_hgb": "same + PRS",
    ORACLE_GENETIC: "true T2D onset probability with the true genetic liability",
    ORACLE_GROUP_MEAN: "true T2D onset probability with only the ancestry-group mean liability",
}


@dataclass(frozen=True)
class Comparison:
    """AUROC(model) - AUROC(reference) on the same test rows, paired bootstrap CI."""

    name: str
    model: str
    reference: str
    estimate: Estimate

    def to_dict(self) -> dict:
        e = self.estimate
        return {
            "model": self.model,
            "reference": self.reference,
            "auroc_difference": e.value,
            "ci_low": e.lower,
            "ci_high": e.upper,
            "n_boot_valid": e.n_boot_valid,
            "se": e.se,
            "minimum_detectable_difference": e.minimum_detectable(),
        }


def evaluate_all(
    data_dir: Path,
    labels_path: Path,
    out_dir: Path,
    *,
    predictions: Path | None = None,
    default_predictions: Path | None = None,
    zero_shot: Path | None = None,
    cohort: Path | None = None,
    n_boot: int = DEFAULT_BOOTSTRAP,
    recalibrate: str | None = None,
    plot_recalibrated: bool = False,
    horizon_days: int = 730,
    baselines: tuple[str, ...] = BASELINES,
    baseline_config: BaselineConfig | None = None,
    decile_pgs: str | None = None,
    ancestry: Path | None = None,
    tracking_uri: str | None = None,
    seed: int = 0,
    meds_dev_dir: Path | None = None,
) -> dict:
    """Evaluate every available model on the test label rows; write the report; return its numbers.

    `meds_dev_dir`: also write each probability model's test predictions there as MEDS-DEV
    prediction tables (person-level rows: kept out of the report folder and of MLflow)."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    labels = read_labels(labels_path)
    splits_path = data_dir / SPLITS_FILE
    split = splits_for(labels, read_subject_splits(data_dir), str(splits_path))
    y = labels["boolean_value"].to_numpy(zero_copy_only=False).astype(bool)
    prs_dir = data_dir / "prs"
    prs, has_prs = prs_for(labels, read_parquet_parts(prs_dir)) if prs_dir.exists() else (None, None)
    events = read_events(data_dir)

    risks: dict[str, np.ndarray] = {}
    if predictions is not None:
        risks |= align_scores(predictions, labels, split, {FINETUNED: "risk", FINETUNED_MASKED: "risk_prs_masked"})
    if default_predictions is not None:
        risks |= align_scores(default_predictions, labels, split, {FINETUNED_DEFAULT: "risk"})
    if zero_shot is not None:
        risks |= align_scores(zero_shot, labels, split, {ZS_PATH: "zs_path_probability", ZS_SHARE: "zs_share"})
    fitted = baseline_risks(events, labels, split, prs, has_prs, baseline_config, tuple(baselines)) if baselines else {}
    risks |= fitted
    refused: dict[str, str] = {}  # model -> why its recalibration was refused (never inverted)
    if recalibrate:
        risks |= recalibrated(dict(risks), y.astype(int), split, recalibrate, refused)
    truth = load_truth(cohort) if cohort is not None else None
    oracle = oracle_scores(truth, labels, horizon_days, str(cohort)) if truth is not None else None
    if oracle is not None:
        risks |= oracle.risks

    test = split == TEST
    if not 0 < int(y[test].sum()) < int(test.sum()):
        raise ValueError(
            f"{labels_path}: the test split needs both classes: {int(y[test].sum())} positives "
            f"of {int(test.sum())} rows"
        )
    test_risks = {name: risk[test] for name, risk in risks.items()}
    if meds_dev_dir is not None:
        write_meds_dev_predictions(meds_dev_dir, labels.filter(pa.array(test)), test_risks)
    # a person has a label row per prediction time: resample persons, so their rows stay together
    persons = labels["subject_id"].to_numpy(zero_copy_only=False)[test]
    results = [
        evaluate_predictions(name, y[test], risk, n_boot=n_boot, seed=seed, groups=persons)
        for name, risk in test_risks.items()
    ]
    by_name = {r.name: r for r in results}
    best_baseline = max(fitted, key=lambda n: by_name[n].auroc.value) if fitted else None
    headline = FINETUNED if FINETUNED in risks else best_baseline
    comparisons = _comparisons(y[test], test_risks, list(fitted), headline, n_boot, seed, persons)

    if decile_pgs is None and cohort is not None:
        decile_pgs = trait_pgs(cohort)
    prs_test = None
    if prs is not None:
        column = pgs_column(prs_dir, decile_pgs)
        prs_test = np.where(has_prs[test], prs[test, column], np.nan)
    groups = subgroups(events, labels, has_prs, ancestry)
    if "ancestry" not in groups and truth is not None:
        groups["ancestry"] = ancestry_of(labels["subject_id"].to_numpy(zero_copy_only=False), truth_ancestry(truth))
    out_dir.mkdir(parents=True, exist_ok=True)
    # figures: each model once (a Platt-recalibrated ROC is the raw one); recalibrated curves on request
    plotted = [k for k in test_risks if " (" not in k or plot_recalibrated]
    probabilities = {k: test_risks[k] for k in plotted if test_risks[k].min() >= 0 and test_risks[k].max() <= 1}
    paths = save_figures(
        out_dir, y[test], probabilities, prs_test, decile_model=headline if headline in probabilities else None
    )
    paths += write_stratified(
        out_dir,
        y[test],
        test_risks,
        {k: v[test] for k, v in groups.items()},
        prs_test,
        n_boot=n_boot,
        seed=seed,
        persons=persons,
    )
    subgroup_md = out_dir / "subgroups.md"
    key_models = [
        m
        for m in (FINETUNED, FINETUNED_MASKED, FINETUNED_DEFAULT, ZS_PATH, best_baseline, ORACLE_GENETIC)
        if m in risks
    ]
    subgroup_md.write_text(subgroup_markdown(pl.read_csv(out_dir / "subgroups.csv"), key_models))
    paths.append(subgroup_md)

    summary = {
        "labels": str(labels_path),
        "n_test": int(test.sum()),
        "n_test_positive": int(y[test].sum()),
        "n_boot": n_boot,
        "resampled": "persons",  # bootstrap unit: all of a drawn person's label rows
        "seed": seed,
        "decile_pgs": decile_pgs,
        "headline": headline,
        "best_baseline": best_baseline,
        "models": {r.name: r.metrics() for r in results},
        "comparisons": {c.name: c.to_dict() for c in comparisons},
        "prs_use": _prs_use(test_risks, prs_test, decile_pgs),
        "oracle": None
        if oracle is None
        else {"horizon_days": oracle.horizon_days, "test_rows_already_begun": int(oracle.already_begun[test].sum())},
        "acceptance": _acceptance(by_name, comparisons, list(fitted), int(y[test].sum())),
        "recalibration_refused": refused,
    }
    report = out_dir / "report.md"
    report.write_text(report_markdown(summary, results, comparisons))
    report_json = out_dir / "report.json"
    report_json.write_text(json.dumps(public_json(summary), indent=2, default=_json_number))
    paths = [report, report_json, *paths]
    summary["files"] = [p.name for p in paths]
    summary["mlflow_run_id"] = _log(tracking_uri, results, comparisons, paths, summary)
    report_json.write_text(json.dumps(public_json(summary), indent=2, default=_json_number))
    return summary


def _comparisons(
    y,
    risks: dict[str, np.ndarray],
    baselines: list[str],
    headline: str | None,
    n_boot: int,
    seed: int,
    persons: np.ndarray | None = None,
) -> list[Comparison]:
    """The paired AUROC differences the task is judged on, for the models that are present."""
    pairs = []
    if FINETUNED in risks and FINETUNED_MASKED in risks:
        pairs.append(("prs_gain", FINETUNED, FINETUNED_MASKED))
    if FINETUNED in risks and FINETUNED_DEFAULT in risks:
        pairs.append(("tuning_gain", FINETUNED, FINETUNED_DEFAULT))
    if HGB in risks and HGB_PRS in risks:  # what a strong tabular model gains from the same PRS
        pairs.append(("baseline_prs_gain", HGB_PRS, HGB))
    if FINETUNED in risks:
        pairs += [(f"margin_over_{b}", FINETUNED, b) for b in baselines]
        if ZS_PATH in risks:
            pairs.append(("margin_over_zero_shot", FINETUNED, ZS_PATH))
    if ORACLE_GENETIC in risks:
        pairs.append(("oracle_genetic_headroom", ORACLE_GENETIC, ORACLE_GROUP_MEAN))
        if headline is not None:
            pairs.append(("gap_to_oracle", ORACLE_GENETIC, headline))
    return [
        Comparison(name, a, b, bootstrap_difference("auroc", y, risks[a], risks[b], n_boot, seed, groups=persons))
        for name, a, b in pairs
    ]


def _prs_use(test_risks: dict[str, np.ndarray], prs_test: np.ndarray | None, pgs_id: str | None) -> dict | None:
    if prs_test is None or FINETUNED not in test_risks or FINETUNED_MASKED not in test_risks:
        return None
    use = prs_use(test_risks[FINETUNED], test_risks[FINETUNED_MASKED], prs_test, pgs_id)
    return None if use is None else use.to_dict()


def _acceptance(
    results: dict[str, ModelResult], comparisons: list[Comparison], baselines: list[str], n_events: int
) -> dict:
    """The task's bars where the models they need are present (None where they are not), judged
    only on at least MIN_EVENTS_FOR_TARGET test events (None below: the sample cannot say)."""
    if n_events < MIN_EVENTS_FOR_TARGET:
        return {"judged": False, "prs_gain_share_of_baseline": None, "beats_every_baseline": None}
    by_name = {c.name: c.estimate for c in comparisons}
    gain, baseline_gain = by_name.get("prs_gain"), by_name.get("baseline_prs_gain")
    margins = [by_name[f"margin_over_{b}"].value for b in baselines if f"margin_over_{b}" in by_name]
    share = None
    if gain is not None and baseline_gain is not None and baseline_gain.value > 0:
        share = bool(gain.value >= MIN_PRS_GAIN_SHARE * baseline_gain.value)
    return {
        "judged": True,
        "prs_gain_share_of_baseline": share,
        "beats_every_baseline": None if not margins else bool(min(margins) > 0),
        "zero_shot_reported_beside_finetuned": (ZS_PATH in results and FINETUNED in results) or None,
    }


def report_markdown(summary: dict, results: list[ModelResult], comparisons: list[Comparison]) -> str:
    """The table of every model and the lines that say what it means."""
    hide_n, hide_events = binary_hidden(summary["n_test"], summary["n_test_positive"])  # small-count rule
    n_test, n_events = show(summary["n_test"], hidden=hide_n), show(summary["n_test_positive"], hidden=hide_events)
    lines = [
        f"# Evaluation on {n_test} test rows ({n_events} events)",
        "",
        f"Bootstrap: {summary['n_boot']} person resamples (seed {summary['seed']}), percentile 95% CIs; "
        "differences are paired (both models on each resample).",
        "",
        markdown_table(results),
    ]
    if summary["n_test_positive"] < MIN_EVENTS_FOR_COMPARISON:
        lines.append(
            f"- Only {n_events} test events (fewer than {MIN_EVENTS_FOR_COMPARISON}): "
            "the intervals are wide and the comparisons below are not evidence either way"
        )
    by_name = {c.name: c for c in comparisons}
    auroc = {r.name: r.auroc for r in results}
    judged = summary["n_test_positive"] >= MIN_EVENTS_FOR_TARGET
    if comparisons:
        worst_mdd = max(c.estimate.minimum_detectable() for c in comparisons)
        lines.append(
            f"- Minimum detectable AUROC difference on this sample (80% power, two-sided 5%, from each paired "
            f"bootstrap's standard error): up to {worst_mdd:.3f}, per comparison in report.json; "
            + (
                "targets are judged"
                if judged
                else f"no target is judged on fewer than {MIN_EVENTS_FOR_TARGET} test events"
            )
        )
    if "prs_gain" in by_name:
        gain = by_name["prs_gain"].estimate
        line = f"- PRS gain = AUROC({FINETUNED}) - AUROC({FINETUNED_MASKED}) = {gain.fmt()}"
        if "baseline_prs_gain" in by_name:
            baseline = by_name["baseline_prs_gain"].estimate.value
            line += f"; target: at least {MIN_PRS_GAIN_SHARE} x what gradient boosting gains from the same score"
            if not judged:
                line += " (not judged on this sample)"
            elif baseline > 0:
                verdict = "meets" if gain.value >= MIN_PRS_GAIN_SHARE * baseline else "falls short of"
                line += f": the point estimate {verdict} it"
        lines.append(line)
    if "baseline_prs_gain" in by_name:
        lines.append(
            f"- The same PRS in gradient boosting: AUROC({HGB_PRS}) - AUROC({HGB}) = "
            f"{by_name['baseline_prs_gain'].estimate.fmt()}"
        )
    if summary.get("prs_use"):
        use = summary["prs_use"]
        lines.append(
            f"- PRS use: on {show(use['n_genotyped'])} genotyped test rows the PRS moves the logit by SD "
            f"{use['logit_shift_sd']:.2f}; that shift correlates with {use['pgs_id'] or 'the PGS'} at r = "
            f"{use['corr_with_pgs']:.2f} [{use['ci_low']:.2f}, {use['ci_high']:.2f}]"
        )
    if "tuning_gain" in by_name:
        lines.append(
            f"- Tuning gain = AUROC({FINETUNED}) - AUROC({FINETUNED_DEFAULT}) = "
            f"{by_name['tuning_gain'].estimate.fmt()} (the sweep picked on validation rows)"
        )
    best = summary["best_baseline"]
    if best is not None:
        lines.append(f"- Best baseline: {best}, AUROC {auroc[best].fmt()}")
    margins = [c for c in comparisons if c.name.startswith("margin_over_") and c.reference != ZS_PATH]
    if margins:
        worst = min(margins, key=lambda c: c.estimate.value)
        beaten = sum(c.estimate.value > 0 for c in margins)
        lines.append(
            f"- {FINETUNED} beats {beaten} of {len(margins)} baselines; margin over {best}: "
            f"{by_name[f'margin_over_{best}'].estimate.fmt()}; smallest margin ({worst.reference}): "
            f"{worst.estimate.fmt()}"
        )
    if ZS_PATH in auroc:
        beside = f" beside fine-tuned AUROC {auroc[FINETUNED].fmt()}" if FINETUNED in auroc else ""
        lines.append(f"- Zero-shot path-probability AUROC {auroc[ZS_PATH].fmt()}{beside}")
    if summary["oracle"] is not None:
        oracle = summary["oracle"]
        lines.append(
            f"- Oracle AUROC with the true genetic liability {auroc[ORACLE_GENETIC].fmt()}, with the "
            f"ancestry-group mean only {auroc[ORACLE_GROUP_MEAN].fmt()}: genetic headroom "
            f"{by_name['oracle_genetic_headroom'].estimate.fmt()} ({show(oracle['test_rows_already_begun'])} "
            f"test rows had T2D begun before the prediction time: oracle risk 1)"
        )
        if "gap_to_oracle" in by_name:
            lines.append(
                f"- Gap to oracle = AUROC({ORACLE_GENETIC}) - AUROC({summary['headline']}) = "
                f"{by_name['gap_to_oracle'].estimate.fmt()}"
            )
    if summary["decile_pgs"]:
        lines.append(f"- PRS deciles from {summary['decile_pgs']}")
    lines += [f"- {name}: {why}" for name, why in summary.get("recalibration_refused", {}).items()]
    lines += ["", "Models:", *[f"- {r.name}: {_note(r.name)}" for r in results]]
    return "\n".join(lines) + "\n"


def _note(name: str) -> str:
    base, recalibrated_by, method = name.partition(" (")
    note = MODEL_NOTES.get(base, "")
    return f"{note}; recalibrated on validation rows ({method}" if recalibrated_by else note


def subgroup_markdown(table: pl.DataFrame, models: list[str]) -> str:
    """AUROC [95% CI] per subgroup level for the key models (every model is in subgroups.csv)."""
    if not models:
        return "# Subgroups\n\nno models\n"
    first = table.filter(pl.col("model") == models[0])
    header = "| attribute | level | n (events) | " + " | ".join(f"{m} AUROC" for m in models) + " |"
    lines = [
        "# Subgroups (test rows; AUROC with bootstrap 95% CI; n/a: too few rows or one class)",
        "",
        header,
        "|" + "---|" * (3 + len(models)),
    ]
    for row in first.iter_rows(named=True):
        cells = []
        for model in models:
            match = table.filter(
                (pl.col("model") == model)
                & (pl.col("attribute") == row["attribute"])
                & (pl.col("level").cast(pl.String) == str(row["level"]))
            ).row(0, named=True)
            estimate = Estimate(
                *(np.nan if match[k] is None else match[k] for k in ("auroc", "auroc_low", "auroc_high"))
            )
            cells.append(estimate.fmt())
        lines.append(
            f"| {row['attribute']} | {row['level']} | {row['n']} ({row['events']}) | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def _log(
    tracking_uri: str | None,
    results: list[ModelResult],
    comparisons: list[Comparison],
    paths: list[Path],
    summary: dict,
) -> str | None:
    """One run in experiment `ehrfm-evaluate`: every metric, the comparisons, the report files."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    import mlflow

    from ehrfm.tracking import mlflow_tracking, use_experiment

    with mlflow_tracking(uri):
        use_experiment(EXPERIMENT)
        with mlflow.start_run(run_name=f"evaluate-{Path(summary['labels']).stem}") as run:
            mlflow.log_params(
                {
                    "n_boot": summary["n_boot"],
                    "seed": summary["seed"],
                    "n_test": public_json(summary)["n_test"],
                    "n_test_positive": public_json(summary)["n_test_positive"],
                    "headline": summary["headline"],
                    "best_baseline": summary["best_baseline"],
                    "decile_pgs": summary["decile_pgs"],
                }
            )
            log_to_mlflow(results, paths)
            comparison_metrics = {
                metric_key(f"comparison/{c.name}", k): v
                for c in comparisons
                for k, v in c.to_dict().items()
                if isinstance(v, float) and np.isfinite(v)
            }
            mlflow.log_metrics(comparison_metrics)
            if summary.get("prs_use"):
                mlflow.log_metrics(
                    {
                        f"prs_use/{k}": float(v)
                        for k, v in summary["prs_use"].items()
                        if isinstance(v, (int, float)) and np.isfinite(v)
                    }
                )
            return run.info.run_id


def _json_number(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_meds_dev_predictions(directory: Path, test_labels: pa.Table, test_risks: dict[str, np.ndarray]) -> list[Path]:
    """One MEDS-DEV prediction table per model whose scores are probabilities (threshold 0.5)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, risk in test_risks.items():
        if np.isnan(risk).any() or risk.min() < 0 or risk.max() > 1:
            continue  # scores that are not probabilities (or rows a model did not score)
        table = prediction_table(
            test_labels["subject_id"], test_labels["prediction_time"], test_labels["boolean_value"], risk
        )
        path = directory / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name).strip('_')}.parquet"
        write_predictions(table, path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ehrfm evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="preprocessed dir (MEDS): data/, metadata/, prs/")
    parser.add_argument("--labels", type=Path, required=True, help="labels.parquet from `ehrfm label`")
    parser.add_argument("--predictions", type=Path, default=None, help="fine-tuning predictions.parquet")
    parser.add_argument(
        "--default-predictions",
        type=Path,
        default=None,
        help="the default fine-tune's predictions.parquet when --predictions is a sweep's winner",
    )
    parser.add_argument("--zero-shot", type=Path, default=None, help="zero_shot.parquet")
    parser.add_argument("--cohort", type=Path, default=None, help="synthetic cohort dir with truth/ (T2D oracle)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n-boot", type=int, default=DEFAULT_BOOTSTRAP)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--recalibrate",
        choices=["platt", "isotonic"],
        default=None,
        help="also report each model recalibrated on its validation rows",
    )
    parser.add_argument(
        "--plot-recalibrated", action="store_true", help="also draw the recalibrated models in the figures"
    )
    parser.add_argument("--horizon-days", type=int, default=730, help="the labels' horizon (for the oracle)")
    parser.add_argument(
        "--baselines",
        nargs="*",
        default=list(BASELINES),
        choices=BASELINES,
        help="baselines to fit (none: pass the flag with no names)",
    )
    add_config_arguments(parser, "BaselineConfig", flag="--baseline-config")
    parser.add_argument(
        "--decile-pgs",
        default=None,
        help="PGS id for the PRS deciles (default: the cohort truth's T2D score, else the first PGS)",
    )
    parser.add_argument("--ancestry", type=Path, default=None, help="parquet with subject_id, ancestry")
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow URI (default $MLFLOW_TRACKING_URI; none: no logging)"
    )
    parser.add_argument(
        "--meds-dev-predictions",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write each model's test predictions as MEDS-DEV prediction tables (<model>.parquet) to DIR",
    )
    args = parser.parse_args(argv)
    config = parse_config(parser, BaselineConfig, args, config="baseline_config")
    summary = evaluate_all(
        args.data,
        args.labels,
        args.out,
        predictions=args.predictions,
        default_predictions=args.default_predictions,
        zero_shot=args.zero_shot,
        cohort=args.cohort,
        n_boot=args.n_boot,
        recalibrate=args.recalibrate,
        plot_recalibrated=args.plot_recalibrated,
        horizon_days=args.horizon_days,
        baselines=tuple(args.baselines),
        baseline_config=config,
        decile_pgs=args.decile_pgs,
        ancestry=args.ancestry,
        tracking_uri=args.tracking_uri,
        seed=args.seed,
        meds_dev_dir=args.meds_dev_predictions,
    )
    print((args.out / "report.md").read_text())
    if summary["mlflow_run_id"]:
        print(f"MLflow run {summary['mlflow_run_id']} in experiment {EXPERIMENT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
