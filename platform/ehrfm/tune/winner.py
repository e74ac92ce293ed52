"""The sweep's winner: the best trial's best epoch becomes a calibrated risk model scored on the
test split (once, for this trial only), then goes through the registry's champion rule."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ehrfm.tracking import mlflow_tracking
from ehrfm.transfer.finetune import RESULT_FILE, PreparedData, finalize_run
from ehrfm.tune.trial import TrialContext, trial_finetune_config
from ehrfm.tune.tuner import METRIC

BEST_DIR = "best"


def finalize_best(sweep_dir: Path, context: TrialContext, best: dict, data: PreparedData) -> dict:
    """The best trial's kept epoch -> <sweep>/best: model/, predictions.parquet (val and test) and
    finetune_result.json, the files `ehrfm finetune` writes, so evaluate and register read them."""
    from ray.train import Result

    cfg = trial_finetune_config(context, best["config"], best["trial_id"])
    train_result = Result.from_path(cfg.run_dir())
    cfg.run.storage_path, cfg.run.name = str(sweep_dir), BEST_DIR
    summary = finalize_run(cfg, data, train_result)
    summary |= {"trial_id": best["trial_id"], "config": best["config"], "train_run": str(train_result.path)}
    (Path(summary["run_dir"]) / RESULT_FILE).write_text(json.dumps(summary, indent=2, default=str))
    return summary


def register_winner(
    summary: dict, data: PreparedData, task: str, tracking_uri: str, parent_run_id: str, n_boot: int
) -> dict[str, Any]:
    """Log the winner (with a card: test AUROC/AUPRC with bootstrap CIs) into the sweep's parent
    run, so each child keeps only its per-epoch curve, and register it: `champion` moves only if
    its val AUROC beats the current champion's. The new version is tagged with its trial id."""
    import mlflow
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from mlflow import MlflowClient

    from ehrfm.evaluate.report import evaluate_predictions
    from ehrfm.mlops.registry import log_risk_model, model_card, register_if_better
    from ehrfm.model.risk import load_risk_model
    from ehrfm.tune.runs import TRIAL_TAG

    _, spec = load_risk_model(summary["model_dir"])
    predictions = pq.read_table(Path(summary["run_dir"]) / "predictions.parquet")
    test = predictions.filter(pc.equal(predictions["split"], "test"))
    results = [
        evaluate_predictions(
            "finetuned (sweep winner)",
            test["label"].to_numpy(zero_copy_only=False),
            test["risk"].to_numpy(),
            n_boot=n_boot,
            groups=test["subject_id"].to_numpy(),
        )
    ]
    counts = {f"{split} {k}": v for split, c in data.counts().items() for k, v in c.items() if k != "genotyped"}
    metrics = {k: float(v) for k, v in summary["metrics"].items()}
    metrics |= {"test_auroc_ci_low": results[0].auroc.lower, "test_auroc_ci_high": results[0].auroc.upper}
    with mlflow_tracking(tracking_uri):
        # resuming a run by id is refused while the process's active experiment (set by any
        # earlier `mlflow.set_experiment`, possibly on another server) is a different one
        mlflow.set_experiment(experiment_id=MlflowClient().get_run(parent_run_id).info.experiment_id)
        with mlflow.start_run(run_id=parent_run_id):
            model_uri = log_risk_model(summary["model_dir"], task, metrics, model_card(spec, counts, results))
            outcome = register_if_better(model_uri, task, metrics[METRIC], METRIC)
            MlflowClient().set_model_version_tag(
                outcome["name"], str(outcome["version"]), TRIAL_TAG, summary["trial_id"]
            )
    outcome["model_uri"] = model_uri
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in outcome.items()}
