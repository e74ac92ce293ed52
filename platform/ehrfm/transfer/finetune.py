"""`ehrfm finetune` / jobs/finetune.py: a risk head on a pretrained decoder, trained on Ray Train.

    python jobs/finetune.py --config jobs/configs/finetune-t2d.yaml --task t2d \
        --pretrained RUN_OR_CHECKPOINT --data PREPROCESSED [--labels labels.parquet] [key.path=value ...]

Driver steps: resolve the pretrained checkpoint; label on the fly when no labels are given; cut
prediction windows (`build_examples`) and split them by the timelines' split column; fit on Ray
Train (`ehrfm.transfer.finetune_loop`), keeping the epoch with the best validation AUROC; then,
on the driver, score val and test with the PRS as given and masked, fit Platt scaling on the
validation logits only, and write `<run_dir>/model/` (risk-model directory),
`<run_dir>/predictions.parquet` and `<run_dir>/finetune_result.json`.

Ray Tune (issue #6) reuses the pieces: `prepare_finetune` once, then per trial
`build_finetune_trainer(trial_cfg, data.ray_datasets(trial_cfg), finetune_run_config(trial_cfg, callbacks))`
and `finalize_run` for the chosen trial.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ehrfm.calibration import platt_or_none
from ehrfm.config import add_config_arguments, out_dir, parse_config
from ehrfm.constants import SPLITS
from ehrfm.metrics import auroc
from ehrfm.model.io import CONFIG_FILE, WEIGHTS_FILE, load_model_config
from ehrfm.model.risk import (
    TOKENIZER_FILE,
    HeadSpec,
    RiskModel,
    head_uses_prs,
    load_risk_model,
    predict_logits,
    save_risk_model,
)
from ehrfm.paths import absolute_path
from ehrfm.training.launch import artifact_root, torch_trainer
from ehrfm.training.pretrain import RESULT_FILE as PRETRAIN_RESULT_FILE
from ehrfm.training.run_logger import RunLogger, resolve_tracking_uri
from ehrfm.training.windows import TimelineManifest
from ehrfm.transfer.examples import build_examples, example_tensors, read_labels
from ehrfm.transfer.finetune_config import FinetuneConfig
from ehrfm.transfer.value_bins import readout_if_binned

RESULT_FILE = "finetune_result.json"
PREDICTIONS_FILE = "predictions.parquet"
MODEL_DIR = "model"
QUANTILES = 101
PREDICTION_COLUMNS = [
    "subject_id",
    "prediction_time",
    "split",
    "label",
    "risk",
    "risk_prs_masked",
    "logit",
    "logit_prs_masked",
]


# ---- inputs ----------------------------------------------------------------------------------
def resolve_pretrained(path: str | Path) -> Path:
    """A checkpoint dir (model.pt + model_config.json) from itself or from a pretraining run dir:
    the run's pretrain_result.json "checkpoint", else its newest checkpoint_* dir."""
    path = Path(path)

    def is_checkpoint(p: Path) -> bool:
        return (p / WEIGHTS_FILE).is_file() and (p / CONFIG_FILE).is_file()

    if is_checkpoint(path):
        return path
    summary = path / PRETRAIN_RESULT_FILE
    if summary.is_file():
        recorded = json.loads(summary.read_text()).get("checkpoint")
        if recorded and is_checkpoint(Path(recorded)):
            return Path(recorded)
    candidates = sorted((p for p in path.glob("checkpoint_*") if is_checkpoint(p)), key=lambda p: p.name)
    if candidates:
        return candidates[-1]
    raise FileNotFoundError(
        f"{path}: not a checkpoint ({WEIGHTS_FILE} + {CONFIG_FILE}), and no "
        f"{PRETRAIN_RESULT_FILE} checkpoint or checkpoint_* directory inside"
    )


def horizon_of(task: str) -> int:
    from ehrfm.tasks.definitions import load_task

    try:
        return load_task(task).horizon_days
    except FileNotFoundError as err:
        raise ValueError(f"task {task!r} has no task YAML to read the horizon from: set horizon_days") from err


def label_on_the_fly(cfg: FinetuneConfig) -> pa.Table:
    """Label <data>/events with the task into <run_dir>/labels/ (labels.parquet + account.json)."""
    import ray

    from ehrfm.tasks.concept_sets import find_concept_ancestor, read_concept_ancestor, read_concept_table
    from ehrfm.tasks.definitions import load_task, resolve_task
    from ehrfm.tasks.labeler import event_shards, label_shards, task_codebook

    ancestry, concepts = None, None
    if cfg.data.omop and find_concept_ancestor(Path(cfg.data.omop)):
        ancestry = read_concept_ancestor(Path(cfg.data.omop))
    if cfg.data.omop:
        concepts = read_concept_table(Path(cfg.data.omop))
    events = Path(cfg.data.dir)  # the MEDS layout (data/<split>/) or the old events/; codes as written there
    task = resolve_task(load_task(cfg.task), ancestry, codebook=task_codebook(events, concepts))
    out = Path(cfg.run_dir()) / "labels"
    labels, account = label_shards(event_shards(events), task, out, use_ray=ray.is_initialized())
    print(f"labeled {account.labeled} of {account.persons_in} persons ({account.positive} positive) -> {out}")
    return labels


@dataclass
class PreparedData:
    """The prediction-window examples of each split, built once and shared by every run on them."""

    examples: dict[str, pa.Table]
    tokenizer: str  # the tokenizer.json the timelines were made with
    pgs_ids: list[str]
    tokenizer_version: str

    def counts(self) -> dict[str, dict[str, int]]:
        def count(table: pa.Table) -> dict[str, int]:
            return {
                "examples": table.num_rows,
                "positives": int(pc.sum(table["label"]).as_py() or 0),
                "genotyped": int(pc.sum(table["has_prs"]).as_py() or 0),
            }

        return {split: count(table) for split, table in self.examples.items()}

    def ray_datasets(self, cfg: FinetuneConfig, blocks: int = 8) -> dict:
        """train (positives repeated when imbalance is oversample) and val Ray Datasets."""
        import ray.data

        train = self.examples["train"]
        if cfg.train.imbalance == "oversample":
            train = oversample_positives(train)
        out = {}
        for split, table in (("train", train), ("val", self.examples["val"])):
            step = max(1, -(-table.num_rows // blocks))
            out[split] = ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])
        return out


def oversample_positives(table: pa.Table) -> pa.Table:
    """Positives repeated (whole copies) until they are about as many as the negatives."""
    labels = table["label"].to_numpy(zero_copy_only=False)
    positives, negatives = np.flatnonzero(labels), np.flatnonzero(~labels)
    copies = max(1, int(round(len(negatives) / max(len(positives), 1))))
    index = np.concatenate([negatives, np.tile(positives, copies)])
    return table.take(pa.array(np.sort(index)))


def prepare_finetune(cfg: FinetuneConfig) -> tuple[FinetuneConfig, PreparedData]:
    """A resolved copy of `cfg` (absolute paths, pretrained checkpoint dir, context, horizon,
    pos_weight) and the examples per split; checks that model and data belong together."""
    if not cfg.data.dir:
        raise ValueError("no data directory: pass --data DIR (the preprocessed dir holding timelines/)")
    if not cfg.model.pretrained:
        raise ValueError("no pretrained model: pass --pretrained RUN_OR_CHECKPOINT")
    if "://" in cfg.run.storage_path:
        raise ValueError(
            f"run.storage_path {cfg.run.storage_path} is remote: fine-tuning writes model/ and "
            "predictions.parquet with local file I/O, so use a local path or a shared mount"
        )
    cfg = cfg.model_copy(deep=True)
    cfg.data.dir = absolute_path(cfg.data.dir)
    cfg.run.storage_path = absolute_path(cfg.run.storage_path)
    cfg.model.pretrained = str(resolve_pretrained(absolute_path(cfg.model.pretrained)))
    model_cfg = load_model_config(cfg.model.pretrained)
    manifest = TimelineManifest.read(cfg.data.dir)
    if (model_cfg.vocab_size, model_cfg.num_pgs) != (manifest.vocab_size, manifest.num_pgs):
        raise ValueError(
            f"{cfg.model.pretrained}/{CONFIG_FILE} has vocab_size={model_cfg.vocab_size}, "
            f"num_pgs={model_cfg.num_pgs} but {cfg.data.dir}/timelines/manifest.json has "
            f"{manifest.vocab_size}, {manifest.num_pgs}: the model was pretrained on other data"
        )
    if head_uses_prs(cfg.model.head_inputs) and model_cfg.fusion == "none":
        inputs = cfg.model.head_inputs.replace("+prs", "") or "last"
        raise ValueError(
            f"{cfg.model.pretrained} has no PRS fusion (an EHR-only decoder): set model.head_inputs={inputs} "
            "(to add PRS to it: pretrain an adapter, model.adapter=true model.fusion=prefix, on data with PRS)"
        )
    cfg.data.context = cfg.data.context or model_cfg.context
    if cfg.data.context > model_cfg.context:
        raise ValueError(
            f"data.context={cfg.data.context} exceeds the {model_cfg.context} tokens the model was pretrained on"
        )
    cfg.horizon_days = cfg.horizon_days or horizon_of(cfg.task)
    tokenizer = Path(cfg.data.dir) / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise FileNotFoundError(f"{tokenizer} not found: the risk model ships the tokenizer of its timelines")
    Path(cfg.run_dir()).mkdir(parents=True, exist_ok=True)

    if cfg.data.labels:
        cfg.data.labels = absolute_path(cfg.data.labels)
        labels = read_labels(cfg.data.labels)
    else:
        labels = label_on_the_fly(cfg)
    examples = build_examples(cfg.data.dir, labels, cfg.data.context, cfg.data.history_windows)
    split_column = examples["split"]
    data = PreparedData(
        examples={s: examples.filter(pc.equal(split_column, s)) for s in SPLITS},
        tokenizer=str(tokenizer),
        pgs_ids=manifest.pgs_ids,
        tokenizer_version=str(json.loads(tokenizer.read_text()).get("version", "")),
    )
    counts = data.counts()
    for split in ("train", "val"):
        n, positives = counts[split]["examples"], counts[split]["positives"]
        if positives == 0 or positives == n:
            raise ValueError(
                f"the {split} split has {positives} positives among {n} examples: fine-tuning "
                "needs both classes in train and val"
            )
    if cfg.train.imbalance == "pos_weight" and cfg.train.pos_weight is None:
        train = counts["train"]
        cfg.train.pos_weight = (train["examples"] - train["positives"]) / train["positives"]
    return cfg, data


# ---- the Ray Train run -----------------------------------------------------------------------
def head_spec(cfg: FinetuneConfig, data: PreparedData) -> HeadSpec:
    """The spec every epoch checkpoint carries (calibration and metrics come at the end)."""
    readout = readout_if_binned(
        data.tokenizer, cfg.model.value_codes, tuple(cfg.model.value_recency_days), cfg.model.value_encoding
    )
    return HeadSpec(
        task=cfg.task,
        horizon_days=int(cfg.horizon_days),
        context=int(cfg.data.context),
        head_inputs=cfg.model.head_inputs,
        history_windows=int(cfg.data.history_windows),
        pgs_ids=list(data.pgs_ids),
        tokenizer_version=data.tokenizer_version,
        **HeadSpec.value_fields(readout),
    )


def finetune_run_config(cfg: FinetuneConfig, callbacks: list | None = None):
    """RunConfig of a fine-tuning run: keeps the best epochs by val_auroc (plus the latest)."""
    import ray.train

    return ray.train.RunConfig(
        name=cfg.run.name,
        storage_path=cfg.run.storage_path,
        callbacks=callbacks,
        failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=cfg.train.keep_checkpoints, checkpoint_score_attribute="val_auroc", checkpoint_score_order="max"
        ),
    )


def tracking_uri_for(cfg: FinetuneConfig) -> str | None:
    return resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.run.storage_path) if cfg.mlflow.enabled else None


def artifact_root_for(cfg: FinetuneConfig) -> str | None:
    return artifact_root(cfg.run.storage_path)


def build_finetune_trainer(
    cfg: FinetuneConfig,
    datasets: dict,
    run_config=None,
    data: PreparedData | None = None,
    tracking_uri: str | None = None,
):
    """TorchTrainer for a resolved `cfg` (from `prepare_finetune`) on {"train", "val"} datasets.

    `run_config` None: `finetune_run_config(cfg)`. `data` supplies the head spec and tokenizer;
    without it they are read again from cfg.data.dir. `tracking_uri` None: `tracking_uri_for(cfg)`
    (no MLflow when mlflow.enabled is false).
    """
    from ehrfm.transfer.finetune_loop import finetune_loop_per_worker

    if cfg.data.context is None or not (Path(cfg.model.pretrained) / WEIGHTS_FILE).is_file():
        raise ValueError("build_finetune_trainer needs a resolved config: call prepare_finetune first")
    if data is None:
        manifest = TimelineManifest.read(cfg.data.dir)
        tokenizer = Path(cfg.data.dir) / TOKENIZER_FILE
        data = PreparedData(
            {}, str(tokenizer), manifest.pgs_ids, str(json.loads(tokenizer.read_text()).get("version", ""))
        )
    tracking_uri = tracking_uri or tracking_uri_for(cfg)
    loop_config = {
        "config": cfg.model_dump(mode="json"),
        "spec": head_spec(cfg, data).to_json(),
        "tokenizer": data.tokenizer,
        "tracking_uri": tracking_uri,
        "artifact_root": artifact_root_for(cfg),
        "counts": data.counts() if data.examples else {},
    }
    run_config = run_config if run_config is not None else finetune_run_config(cfg)
    return torch_trainer(finetune_loop_per_worker, loop_config, cfg.scaling, run_config, datasets)


# ---- after the fit: calibration, predictions, the final model ---------------------------------
@torch.no_grad()
def predict_examples(model: RiskModel, table: pa.Table, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Logits with the PRS as given and with the PRS masked, in row order."""
    given, masked = [], []
    for start in range(0, table.num_rows, batch_size):
        batch = example_tensors(table.slice(start, batch_size))
        given.append(predict_logits(model, batch).numpy())
        masked.append(predict_logits(model, batch, mask_prs=True).numpy())
    empty = np.zeros(0, np.float32)
    return (np.concatenate(given) if given else empty), (np.concatenate(masked) if masked else empty)


def prediction_table(table: pa.Table, spec: HeadSpec, logit: np.ndarray, masked: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "subject_id": table["subject_id"],
            "prediction_time": table["prediction_time"],
            "split": table["split"],
            "label": table["label"],
            "risk": pa.array(spec.calibrate(logit)),
            "risk_prs_masked": pa.array(spec.calibrate(masked)),
            "logit": pa.array(logit.astype(np.float64)),
            "logit_prs_masked": pa.array(masked.astype(np.float64)),
        }
    )


def finalize_run(cfg: FinetuneConfig, data: PreparedData, result, batch_size: int | None = None) -> dict:
    """Best epoch -> calibrated risk model in <run_dir>/model, predictions, metrics; returns the summary."""
    best = result.get_best_checkpoint("val_auroc", "max")
    if best is None:
        raise RuntimeError(f"fine-tuning run {cfg.run_dir()} reported no checkpoint")
    run_dir = Path(cfg.run_dir())
    batch_size = batch_size or cfg.train.eval_batch_size
    with best.as_directory() as directory:
        model, spec = load_risk_model(directory)
        state = json.loads((Path(directory) / "train_state.json").read_text())
        scores = {split: predict_examples(model, data.examples[split], batch_size) for split in ("val", "test")}
        labels = {split: data.examples[split]["label"].to_numpy(zero_copy_only=False) for split in scores}
        # validation only; test stays untouched. None (uncalibrated) when refused: never inverted
        spec.platt = platt_or_none(scores["val"][0], labels["val"])
        val_risk = spec.calibrate(scores["val"][0])
        spec.reference_quantiles = np.quantile(val_risk, np.linspace(0.0, 1.0, QUANTILES)).tolist()
        metrics = {"best_epoch": float(state["epoch"])}
        for split, (given, masked) in scores.items():
            metrics[f"{split}_auroc"] = auroc(labels[split], given)
            metrics[f"{split}_auroc_prs_masked"] = auroc(labels[split], masked)
        spec.metrics = metrics
        save_risk_model(run_dir / MODEL_DIR, model, spec, Path(directory) / TOKENIZER_FILE)
    predictions = pa.concat_tables([prediction_table(data.examples[s], spec, *scores[s]) for s in scores])
    pq.write_table(predictions, run_dir / PREDICTIONS_FILE)
    latest = result.checkpoint
    history = state["history"]
    if latest is not None:
        with latest.as_directory() as directory:
            history = json.loads((Path(directory) / "train_state.json").read_text())["history"]
    return {
        "run_dir": str(run_dir),
        "model_dir": str(run_dir / MODEL_DIR),
        "best_checkpoint": best.path,
        "metrics": metrics,
        "platt": None if spec.platt is None else list(spec.platt),
        "history": history,
        "counts": data.counts(),
    }


def log_final(cfg: FinetuneConfig, tracking_uri: str | None, summary: dict) -> None:
    """Final metrics and example counts into the run rank 0 logged the epochs to (driver side)."""
    if not tracking_uri:
        return
    logger = RunLogger(tracking_uri, cfg.mlflow.experiment, cfg.run_dir(), cfg.run.name, artifact_root_for(cfg))
    final = {f"final_{k}": v for k, v in summary["metrics"].items()}
    final["fit_seconds"] = summary["fit_seconds"]
    for split, count in summary["counts"].items():
        final |= {f"{split}_{k}": float(v) for k, v in count.items()}
    logger.log_metrics(final, int(summary["metrics"]["best_epoch"]))
    logger.finish("FINISHED")


def run_finetune(cfg: FinetuneConfig, prepared: tuple[FinetuneConfig, PreparedData] | None = None) -> dict:
    """Prepare (unless given), fit on Ray Train, calibrate and write outputs; returns the summary."""
    cfg, data = prepared if prepared is not None else prepare_finetune(cfg)
    tracking_uri = tracking_uri_for(cfg)
    started = time.perf_counter()
    trainer = build_finetune_trainer(cfg, data.ray_datasets(cfg), data=data, tracking_uri=tracking_uri)
    result = trainer.fit()
    fit_seconds = time.perf_counter() - started
    summary = finalize_run(cfg, data, result)
    summary["fit_seconds"] = fit_seconds
    summary["tracking_uri"] = tracking_uri
    log_final(cfg, tracking_uri, summary)
    (Path(cfg.run_dir()) / RESULT_FILE).write_text(json.dumps(summary, indent=2, default=str))
    return summary


# the command's flags as config paths (`--data X` is `data.dir=X`)
FLAGS = {
    "task": "task",
    "pretrained": "model.pretrained",
    "data": "data.dir",
    "labels": "data.labels",
    "out": out_dir("run.storage_path", "run.name"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ehrfm finetune", description=__doc__.splitlines()[0])
    add_config_arguments(parser, "fine-tuning (FinetuneConfig)")
    parser.add_argument("--task", help="task name or YAML (overrides task)")
    parser.add_argument("--pretrained", help="pretraining run dir or checkpoint dir (overrides model.pretrained)")
    parser.add_argument("--data", help="preprocessed dir holding timelines/ (overrides data.dir)")
    parser.add_argument("--labels", help="label parquet (overrides data.labels); absent: label <data>/events")
    parser.add_argument("--out", help="run directory (sets run.storage_path and run.name)")
    args = parser.parse_args(argv)
    cfg = parse_config(parser, FinetuneConfig, args, FLAGS)
    import ray

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS / a running cluster if there is one, else a local instance
    summary = run_finetune(cfg)
    print(json.dumps({k: summary[k] for k in ("run_dir", "model_dir", "metrics", "fit_seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
