"""`ehrfm register`: log a fine-tuned risk model with its card, register it as `ehrfm-<task>`, and
move the `champion` alias only when it beats the current champion on validation AUROC.

Reads what the earlier stages wrote: the risk-model directory and `finetune_result.json` (the
validation metric the registry rule compares) and the evaluation's `report.json` / `subgroups.csv`
(test metrics with CIs and the subgroup table for the card). Writes `<out>/registered.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import polars as pl

from ehrfm.evaluate.oracle import ORACLE_GENETIC
from ehrfm.evaluate.report import ModelResult
from ehrfm.evaluate.run import FINETUNED, FINETUNED_MASKED, ZS_PATH
from ehrfm.metrics import Estimate

CARD_MODELS = (FINETUNED, FINETUNED_MASKED, ZS_PATH, ORACLE_GENETIC)


def results_from_report(report: dict, names: tuple[str, ...] = CARD_MODELS) -> list[ModelResult]:
    """ModelResult rows (test split) for the card from an evaluation report.json; baselines too."""
    models = report.get("models", {})
    wanted = [n for n in names if n in models] + [n for n in models if n not in names and not n.startswith("oracle")]
    rows = []
    for name in wanted:
        m = models[name]
        rows.append(
            ModelResult(
                name=name,
                n=_count(m["n"]),
                n_positive=_count(m["n_positive"]),
                auroc=Estimate(m["auroc"], m["auroc_ci_low"], m["auroc_ci_high"]),
                auprc=Estimate(m["auprc"], m["auprc_ci_low"], m["auprc_ci_high"]),
                ece=float(m.get("ece", float("nan"))),
            )
        )
    return rows


def _count(value) -> int | str:
    """A count from report.json: a number, or the string a suppressed count was published as."""
    return value if isinstance(value, str) else int(value)


def subgroup_rows(evaluation_dir: Path, model: str = FINETUNED) -> list[dict]:
    path = evaluation_dir / "subgroups.csv"
    if not path.is_file():
        return []
    table = pl.read_csv(path)
    return table.filter(pl.col("model") == model).drop("model").to_dicts()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ehrfm register", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--finetune", type=Path, required=True, help="fine-tuning run dir (holds model/ and finetune_result.json)"
    )
    parser.add_argument("--evaluation", type=Path, default=None, help="evaluation dir (report.json, subgroups.csv)")
    parser.add_argument("--task", default=None, help="task name (default: the model's own)")
    parser.add_argument("--metric", default="val_auroc", help="validation metric the champion rule compares")
    parser.add_argument("--out", type=Path, required=True, help="where registered.json goes")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow URI (default: $MLFLOW_TRACKING_URI, else the local tracking server, started when needed)",
    )
    args = parser.parse_args(argv)

    import mlflow

    from ehrfm.mlops.registry import log_risk_model, model_card, register_if_better
    from ehrfm.model.risk import HEAD_FILE, HeadSpec
    from ehrfm.tracking import ensure_tracking_uri, use_experiment

    model_dir = args.finetune / "model"
    result = json.loads((args.finetune / "finetune_result.json").read_text())
    spec = HeadSpec.from_json((model_dir / HEAD_FILE).read_text())
    task = args.task or spec.task
    metric = float(result["metrics"][args.metric])
    report = json.loads((args.evaluation / "report.json").read_text()) if args.evaluation else {}
    results = results_from_report(report)
    summary = {
        "test label rows": report.get("n_test", 0),
        "test positives": report.get("n_test_positive", 0),
        "PGS ids": str(len(spec.pgs_ids)),  # not a person count: shown as is
    }
    card = model_card(spec, summary, results, subgroup_rows(args.evaluation) if args.evaluation else None)
    metrics = {k: float(v) for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    for row in results:
        if row.name == FINETUNED:
            metrics |= {"test_auroc_ci_low": row.auroc.lower, "test_auroc_ci_high": row.auroc.upper}

    mlflow.set_tracking_uri(args.tracking_uri or ensure_tracking_uri())
    use_experiment(f"ehrfm-register-{task}")
    with mlflow.start_run(run_name=f"register-{task}"):
        uri = log_risk_model(model_dir, task, metrics, card)
        outcome = register_if_better(uri, task, metric, args.metric)
    outcome["model_uri"] = uri
    outcome = {k: (None if isinstance(v, float) and v != v else v) for k, v in outcome.items()}  # NaN: none
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "registered.json").write_text(json.dumps(outcome, indent=2))
    (args.out / "model_card.md").write_text(card)
    print(json.dumps(outcome, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
