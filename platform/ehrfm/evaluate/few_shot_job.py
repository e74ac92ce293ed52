"""`ehrfm few_shot`: the few-shot protocol (evaluate/few_shot.py) on a preprocessed cohort.

    ehrfm few_shot --pretrained RUN_OR_CHECKPOINT --data PREPROCESSED --labels labels.parquet \
        --out OUT [--config few_shot.yaml] [--tracking-uri URI] [shots=[1,2,4] replicates=5 ...]

Frozen features come from the pretrained decoder (no fine-tuning: the FM head is fit per draw
like the baselines), count features from the MEDS events as the baselines build them, splits from
the timelines (the fine-tune's). OUT holds aggregates only: few_shot.json (settings, published
row counts, the per-(model, k) table and each replicate's metrics), few_shot.csv (the table),
few_shot.md and few_shot_auroc.png (mean test AUROC vs k, min-max band). With a tracking URI
(flag or $MLFLOW_TRACKING_URI) one run in experiment `ehrfm-few-shot` gets the settings as
params, `<model>/auroc_mean` etc. with step = k, and the files.

With `cross_fit_folds=K` (K >= 2) the same heads are also fit on K person folds of all label rows
and every row is scored out of fold (evaluate/cross_fit.py): AUROC/AUPRC with CIs over all rows and
each FM head's paired difference to each count head with its minimum detectable difference, and
each head's ECE raw and after a cross-fitted Platt map, in few_shot.json ("cross_fit"), few_shot.md
and MLflow (`cross_fit/<model>/auroc`). `zero_shot=[Z1,Z2]` (runs of `ehrfm zero_shot` that
together score every label row) adds the zero-shot path probability as a head that fits nothing,
and the zero-shot target (fm_lr - zero_shot <= 0.05) judged on all rows. `shots=[]` runs the
cross-fit alone; `history_windows=N fm_inputs=last+mean` gives the FM head the whole bounded history.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ehrfm.config import add_config_arguments, parse_config
from ehrfm.evaluate.alignment import align_scores
from ehrfm.evaluate.baselines import read_events
from ehrfm.evaluate.cross_fit import ZERO_SHOT, cross_fit_markdown, cross_fit_report
from ehrfm.evaluate.features import CodeVocabulary, build_features
from ehrfm.evaluate.few_shot import (
    COUNT_MODELS,
    FM_COUNTS_HGB,
    FM_ENS,
    FM_ENS_NO_PRS,
    FM_HGB,
    FM_LR,
    FM_LR_NO_PRS,
    METRICS,
    MODELS,
    TEST,
    TRAIN,
    Ensemble,
    FewShotConfig,
    count_designs,
    fm_boosted_design,
    fm_design,
    paired_differences,
    run_few_shot,
    summarize,
)
from ehrfm.evaluate.plots import curve_style
from ehrfm.evaluate.report import metric_key
from ehrfm.evaluate.targets import FEW_SHOT_MAX_K
from ehrfm.model.value_bins import ValueBinReadout
from ehrfm.small_counts import binary_hidden, show
from ehrfm.transfer.examples import read_labels
from ehrfm.transfer.frozen_features import label_row_features
from ehrfm.transfer.value_bins import readout_if_binned

EXPERIMENT = "ehrfm-few-shot"
JSON_FILE, CSV_FILE, MARKDOWN_FILE, PLOT_FILE = "few_shot.json", "few_shot.csv", "few_shot.md", "few_shot_auroc.png"
LABELS = {
    FM_LR: "FM (frozen) + PRS, LR",
    FM_HGB: "FM (frozen) + PRS, GBM",
    FM_ENS: "FM (frozen) + PRS, LR and GBM averaged",
    FM_ENS_NO_PRS: "FM (frozen), PRS masked, LR and GBM averaged",
    FM_COUNTS_HGB: "counts + FM (frozen) + PRS, GBM",
    FM_LR_NO_PRS: "FM (frozen), PRS masked, LR",
    "counts_lr": "counts LR",
    "counts_prs_lr": "counts + PRS LR",
    "counts_hgb": "counts GBM",
    "counts_prs_hgb": "counts + PRS GBM",
    "values_hgb": "last values + age GBM (no counts)",
    ZERO_SHOT: "zero-shot path probability",
}
ZERO_SHOT_FILE, ZERO_SHOT_COLUMN = "zero_shot.parquet", "zs_path_probability"


def zero_shot_files(paths: list[Path]) -> list[Path]:
    """The zero_shot.parquet of each given file or run directory."""
    files = [Path(p) / ZERO_SHOT_FILE if Path(p).is_dir() else Path(p) for p in paths]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise FileNotFoundError(f"zero-shot scores not found: {absent}")
    return files


def published_counts(y: np.ndarray, split: np.ndarray) -> dict[str, str]:
    """Rows and positive rows of the train and test splits under the small-count rule (as strings)."""
    out = {}
    for name, rows in (("train", split == TRAIN), ("test", split == TEST)):
        n, events = int(rows.sum()), int(y[rows].sum())
        hide_n, hide_events = binary_hidden(n, events)
        out[f"n_{name}"] = show(n, hidden=hide_n)
        out[f"n_{name}_positive"] = show(events, hidden=hide_events)
    return out


def value_readout(data_dir: Path, config: FewShotConfig) -> ValueBinReadout | None:
    """The value-bin readout `fm_value_codes` asks for, over the dataset's own tokenizer."""
    path = Path(data_dir) / "tokenizer.json"
    return readout_if_binned(path, config.fm_value_codes, tuple(config.fm_value_recency_days), config.fm_value_encoding)


def few_shot_evaluation(
    checkpoint_dir: Path, data_dir: Path, labels_path: Path, out_dir: Path, config: FewShotConfig
) -> dict:
    """Features, the protocol and the output files; returns what few_shot.json holds."""
    started = time.perf_counter()
    labels = read_labels(labels_path)
    y = labels["boolean_value"].to_numpy(zero_copy_only=False).astype(int)
    zero_shot = zero_shot_files(config.zero_shot)
    if zero_shot:  # a row missing or repeated fails here, in seconds, not after the decoder's pass
        align_scores(zero_shot, labels, None, {ZERO_SHOT: ZERO_SHOT_COLUMN}, required_split=None)
    readout = value_readout(data_dir, config)
    frozen = label_row_features(
        checkpoint_dir,
        data_dir,
        labels,
        config.context,
        config.batch_size,
        config.history_windows,
        prs_masked_too=FM_LR_NO_PRS in config.models or FM_ENS_NO_PRS in config.models,
        prs_summary_too=config.fm_prs == "summary",
        value_readout=readout,
    )
    designs = {}
    mean = frozen.mean if config.fm_inputs == "last+mean" else None
    if config.fm_prs == "summary" and frozen.prs_summary is None:
        raise ValueError("fm_prs=summary needs a decoder with PRS fusion; this one has none (use fm_prs=states)")
    summary = frozen.prs_summary if config.fm_prs == "summary" else None
    scores = (frozen.prs, frozen.has_prs) if config.fm_prs == "scores" else (None, None)
    fm_inputs = fm_design(frozen.hidden, *scores, mean, summary, frozen.value_bins)
    if FM_LR in config.models:
        designs[FM_LR] = fm_inputs
    boosted_heads = any(m in config.models for m in (FM_HGB, FM_ENS, FM_ENS_NO_PRS))
    bin_numbers = (
        readout.bin_numbers(frozen.value_bins) if readout is not None and boosted_heads else None
    )  # their form
    if FM_HGB in config.models or FM_ENS in config.models:
        boosted = fm_boosted_design(fm_inputs, bin_numbers)  # the same inputs, the bins as numbers
        if FM_HGB in config.models:
            designs[FM_HGB] = boosted
        if FM_ENS in config.models:
            designs[FM_ENS] = Ensemble((fm_inputs, boosted))
    if FM_LR_NO_PRS in config.models or FM_ENS_NO_PRS in config.models:
        masked_mean = frozen.mean_prs_masked if config.fm_inputs == "last+mean" else None
        masked = fm_design(
            frozen.hidden_prs_masked, None, None, masked_mean, value_bins=frozen.value_bins
        )  # the same value bins: they are no part of the PRS
        if FM_LR_NO_PRS in config.models:
            designs[FM_LR_NO_PRS] = masked
        if FM_ENS_NO_PRS in config.models:
            designs[FM_ENS_NO_PRS] = Ensemble((masked, fm_boosted_design(masked, bin_numbers)))
    if any(m in config.models for m in (*COUNT_MODELS, FM_COUNTS_HGB)):
        counts = config.features
        events = read_events(data_dir)
        train_labels = labels.filter(pa.array(frozen.split == TRAIN))  # the vocabulary sees train rows only
        vocabulary = CodeVocabulary.fit(
            events, train_labels, tuple(counts.windows_days), counts.min_persons_per_code, counts.max_codes
        )
        features = build_features(events, labels, vocabulary)
        designs |= count_designs(features, frozen.prs, frozen.has_prs, frozen.split, config, fm_inputs.x)
    feature_seconds = time.perf_counter() - started
    records = run_few_shot(designs, y, frozen.split, config)
    fit_seconds = time.perf_counter() - started - feature_seconds
    cross_fit = None
    if config.cross_fit_folds:
        subject_ids = labels["subject_id"].to_numpy()
        fixed = {}
        if zero_shot:  # every label row scored (paired on all of them); now the files' splits are checked too
            fixed = align_scores(zero_shot, labels, frozen.split, {ZERO_SHOT: ZERO_SHOT_COLUMN}, required_split=None)
        cross_fit = cross_fit_report(designs, y, subject_ids, config, config.n_boot, fixed)
        hide_n, hide_events = binary_hidden(len(y), int(y.sum()))
        cross_fit["published"] = {"rows": show(len(y), hidden=hide_n), "events": show(int(y.sum()), hidden=hide_events)}
        for key in ("rows", "events"):  # only the published (small-count-ruled) form leaves the job
            cross_fit.pop(key)
    result = {
        "config": config.model_dump(mode="json"),
        "pretrained": str(checkpoint_dir),
        "labels": str(labels_path),
        "counts": published_counts(y, frozen.split),
        "value_readout_codes": 0 if readout is None else len(readout.codes),  # what the FM heads read
        "feature_seconds": round(feature_seconds, 1),
        "fit_seconds": round(fit_seconds, 1),
        "cross_fit_seconds": round(time.perf_counter() - started - feature_seconds - fit_seconds, 1),
        "summary": summarize(records),
        "paired": paired_differences(records) if FM_LR in designs else [],
        "records": records,
        "cross_fit": cross_fit,
    }
    write_outputs(result, Path(out_dir))
    return result


# ---- outputs ------------------------------------------------------------------------------------
def _number(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def summary_markdown(result: dict) -> str:
    """The per-(model, k) table: mean test AUROC/AUPRC ± SD [min, max] over the replicates."""
    counts = result["counts"]
    if not result["config"]["shots"]:  # cross-fit only (`shots=[]`): no few-shot table to show
        published = result["cross_fit"]["published"]
        return "# Cross-fit only (shots=[])\n\n" + cross_fit_markdown(
            result["cross_fit"], published["rows"], published["events"]
        )
    lines = [
        f"# Few-shot: {result['config']['replicates']} draws per k of k positive + k negative train rows",
        "",
        f"Test rows {counts['n_test']} ({counts['n_test_positive']} positive); "
        f"train rows {counts['n_train']} ({counts['n_train_positive']} positive).",
        "",
        "| model | k | AUROC mean ± SD [min, max] | AUPRC mean ± SD [min, max] | fit |",
        "|---|---|---|---|---|",
    ]

    def cell(row: dict, metric: str) -> str:
        if not math.isfinite(row[f"{metric}_mean"]):
            return "n/a"
        sd = row[f"{metric}_sd"]
        spread = f" ± {sd:.3f}" if math.isfinite(sd) else ""
        return f"{row[f'{metric}_mean']:.3f}{spread} [{row[f'{metric}_min']:.3f}, {row[f'{metric}_max']:.3f}]"

    for row in result["summary"]:
        fit = f"{row['replicates_fit']}/{row['replicates']}" + (f" ({row['reason']})" if row["reason"] else "")
        lines.append(f"| {row['model']} | {row['k']} | {cell(row, 'auroc')} | {cell(row, 'auprc')} | {fit} |")
    text = "\n".join(lines) + "\n"
    if result.get("paired"):
        text += "\n" + paired_markdown(result["paired"])
    if result.get("cross_fit"):
        published = result["cross_fit"]["published"]
        text += "\n" + cross_fit_markdown(result["cross_fit"], published["rows"], published["events"])
    return text


def paired_markdown(paired: list[dict], baselines: tuple[str, ...] = ("counts_hgb", "counts_prs_hgb")) -> str:
    """The FM head minus each boosting head on the same draws, per k, and the few-shot target's verdict."""
    rows = [r for r in paired if r["baseline"] in baselines]
    if not rows:
        return ""
    head = rows[0]["head"]
    lines = [
        f"## {head} minus boosting on the same draws (mean ± SE over the draws; wins: draws where {head} is higher)",
        "",
        "| baseline | k | AUROC difference | wins |",
        "|---|---|---|---|",
    ]
    for r in rows:
        se = r["auroc_difference_se"]
        spread = f" ± {se:.3f}" if math.isfinite(se) else ""
        lines.append(
            f"| {r['baseline']} | {r['k']} | {r['auroc_difference_mean']:+.3f}{spread} | {r['wins']}/{r['draws']} |"
        )
    judged = [r for r in rows if r["baseline"] == "counts_hgb" and r["k"] <= FEW_SHOT_MAX_K]
    if judged:
        misses = [str(r["k"]) for r in judged if not r["auroc_difference_mean"] > 0]
        verdict = "met" if not misses else f"not met (k = {', '.join(misses)})"
        lines += ["", f"{head} above counts_hgb at every k <= {FEW_SHOT_MAX_K} (mean over the draws): {verdict}."]
    return "\n".join(lines) + "\n"


def auroc_figure(summary: list[dict]) -> Figure:
    """Mean test AUROC against k (log2 axis), one line per model with its min-max band."""
    figure = Figure(figsize=(6.5, 4.5), dpi=110)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    models = [m for m in MODELS if any(r["model"] == m for r in summary)]
    for index, model in enumerate(models):
        rows = [r for r in summary if r["model"] == model and math.isfinite(r["auroc_mean"])]
        if not rows:
            continue
        k = np.array([r["k"] for r in rows])
        style = curve_style(index)
        ax.plot(k, [r["auroc_mean"] for r in rows], marker="o", label=LABELS.get(model, model), **style)
        low, high = [r["auroc_min"] for r in rows], [r["auroc_max"] for r in rows]
        ax.fill_between(k, low, high, color=style["color"], alpha=0.15, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("k (positive shots; as many negatives)")
    ax.set_ylabel("test AUROC (mean, min-max band)")
    ax.set_title("Few-shot heads")
    if ax.get_legend_handles_labels()[0]:  # a cross-fit-only run has no curve to name
        ax.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    return figure


def write_outputs(result: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / name for name in (JSON_FILE, CSV_FILE, MARKDOWN_FILE, PLOT_FILE)]
    clean = json.loads(json.dumps(result, default=float), parse_constant=lambda _: None)  # NaN -> null
    paths[0].write_text(json.dumps(clean, indent=2))
    columns = list(result["summary"][0]) if result["summary"] else ["model", "k"]
    with paths[1].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows({k: _number(v) for k, v in row.items()} for row in result["summary"])
    paths[2].write_text(summary_markdown(result))
    auroc_figure(result["summary"]).savefig(paths[3])
    return paths


def log_to_mlflow(uri: str, result: dict, paths: list[Path]) -> str:
    """One run: settings as params, each model's metrics with step = k, the output files."""
    import mlflow

    from ehrfm.tracking import mlflow_tracking, use_experiment

    config = result["config"]
    with mlflow_tracking(uri):
        use_experiment(EXPERIMENT)
        with mlflow.start_run(run_name=f"few-shot-{Path(result['labels']).stem}") as run:
            mlflow.log_params(
                {
                    "shots": ",".join(map(str, config["shots"])),
                    "replicates": config["replicates"],
                    "seed": config["seed"],
                    "models": ",".join(config["models"]),
                    "lr_c": config["lr_c"],
                    "lr_cv_folds": config["lr_cv_folds"],
                    "scale_on": config["scale_on"],
                    "zero_shot_files": len(config["zero_shot"]),
                    "fm_prs": config["fm_prs"],
                    "fm_inputs": config["fm_inputs"],
                    "fm_value_codes": config["fm_value_codes"],
                    "fm_value_recency_days": ",".join(map(str, config["fm_value_recency_days"])),
                    "fm_value_encoding": config["fm_value_encoding"],
                    "value_readout_codes": result.get("value_readout_codes", 0),
                    "hgb_min_samples_leaf": config["hgb_min_samples_leaf"] or "min(20, max(1, 2k // 10))",
                    "hgb_early_stopping": config["hgb_early_stopping"],
                    "hgb_bags": config["hgb_bags"],
                    "pretrained": result["pretrained"],
                    **result["counts"],
                }
            )
            for row in result["summary"]:
                metrics = {
                    metric_key(row["model"], f"{metric}_{stat}"): row[f"{metric}_{stat}"]
                    for metric in METRICS
                    for stat in ("mean", "sd", "min", "max")
                    if math.isfinite(row[f"{metric}_{stat}"])
                }
                metrics[metric_key(row["model"], "replicates_fit")] = float(row["replicates_fit"])
                mlflow.log_metrics(metrics, step=int(row["k"]))
            for row in result.get("paired", []):
                key = metric_key(f"{row['head']}-{row['baseline']}", "auroc_difference_mean")
                mlflow.log_metric(key, row["auroc_difference_mean"], step=int(row["k"]))
            cross_fit = result.get("cross_fit") or {}
            for name, m in cross_fit.get("models", {}).items():
                mlflow.log_metrics(
                    {
                        metric_key(f"cross_fit/{name}", metric): m[metric]
                        for metric in (*METRICS, "ece", "ece_recalibrated")
                    }
                )
            for name, c in cross_fit.get("comparisons", {}).items():
                mlflow.log_metric(metric_key(f"cross_fit/{name}", "auroc_difference"), c["auroc_difference"])
            prs = cross_fit.get("prs_gains") or {}
            for name, c in prs.get("gains", {}).items():
                mlflow.log_metric(metric_key(f"cross_fit/prs_gain/{name}", "auroc_difference"), c["auroc_difference"])
            for head, target in (prs.get("targets") or {}).items():
                contrast = target["fm_gain_minus_share_of_hgb_gain"]
                mlflow.log_metric(metric_key(f"cross_fit/prs_gain/{head}", "minus_share_of_hgb"), contrast)
            if cross_fit.get("zero_shot"):
                gap = cross_fit["zero_shot"]["auroc_difference"]
                mlflow.log_metric(metric_key(f"cross_fit/{FM_LR}-{ZERO_SHOT}", "auroc_difference"), gap)
            for path in paths:
                mlflow.log_artifact(str(path), artifact_path="few_shot")
            return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ehrfm few_shot", description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", type=Path, required=True, help="pretraining run dir or checkpoint dir")
    parser.add_argument("--data", type=Path, required=True, help="preprocessed dir: timelines/, data/ (MEDS)")
    parser.add_argument("--labels", type=Path, required=True, help="labels.parquet from `ehrfm label`")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow URI (default $MLFLOW_TRACKING_URI; none: no logging)"
    )
    add_config_arguments(parser, "FewShotConfig")
    args = parser.parse_args(argv)
    config = parse_config(parser, FewShotConfig, args)
    from ehrfm.transfer.finetune import resolve_pretrained

    checkpoint = resolve_pretrained(args.pretrained)
    result = few_shot_evaluation(checkpoint, args.data, args.labels, args.out, config)
    print(summary_markdown(result))
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        paths = [args.out / name for name in (JSON_FILE, CSV_FILE, MARKDOWN_FILE, PLOT_FILE)]
        print(f"MLflow run {log_to_mlflow(uri, result, paths)} in experiment {EXPERIMENT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
