"""MLflow registry helpers: log a risk model as a pyfunc, register it as `ehrfm-<task>`, move the
`champion` alias only to a better model, and load the champion.

- Logged with models-from-code (`pyfunc_model.py` is the model's code; the weights are a torch
  state dict loaded with weights_only=True), so no pickled object is stored or executed.
- The ehrfm package travels with the model (`code_paths`), so a fresh process with only the
  pinned requirements loads it; the pip requirements are the installed ehrfm's own pins of the
  packages the predictor imports.
- Only the four risk-model files are logged (model.pt, model_config.json, head.json,
  tokenizer.json), never whatever else lives in the directory (fine-tuning writes patient-level
  predictions next to the model). Params, metrics, tags and the card hold aggregates only.
- The validation metric a version was registered with is a version tag (`val_auroc` by default);
  a new version takes the alias only when its metric is strictly greater than the champion's.
- The SHA-256 of every logged risk-model file is computed before upload and recorded on the
  registered version (`weights_sha256`, `weights_manifest`; `checksums.py`); serving refuses a
  version whose downloaded files differ.
"""

from __future__ import annotations

import importlib.metadata
import math
import re
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import ehrfm
from ehrfm.mlops import checksums
from ehrfm.mlops import pyfunc_model as registry_model
from ehrfm.mlops.model_card import model_card  # noqa: F401  (part of this module's interface)
from ehrfm.mlops.pyfunc_model import RISK_MODEL_ARTIFACT, example_record, pyfunc_signature, records_frame
from ehrfm.model.io import CONFIG_FILE, WEIGHTS_FILE
from ehrfm.model.risk import HEAD_FILE, TOKENIZER_FILE
from ehrfm.transfer.predictor import RiskPredictor

CHAMPION = "champion"
MODEL_CARD_FILE = "model_card.md"
RISK_MODEL_FILES = (WEIGHTS_FILE, CONFIG_FILE, HEAD_FILE, TOKENIZER_FILE)
# What the predictor imports at scoring time; pins come from the installed ehrfm's metadata.
SERVING_PACKAGES = ("torch", "numpy", "pyarrow", "pandas", "pydantic", "meds", "mlflow", "ray", "pyyaml", "psutil")


def registered_name(task: str) -> str:
    return f"ehrfm-{task}"


def serving_requirements() -> list[str]:
    """Pinned requirements of the pyfunc: ehrfm's own pins for SERVING_PACKAGES."""
    pins = []
    for requirement in importlib.metadata.requires("ehrfm") or []:
        if "extra ==" in requirement:
            continue
        name = re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()
        if name in SERVING_PACKAGES:
            pins.append(requirement)
    missing = set(SERVING_PACKAGES) - {re.split(r"[\[<>=!~; ]", p, maxsplit=1)[0].lower() for p in pins}
    if missing:
        raise RuntimeError(f"the installed ehrfm does not pin {sorted(missing)}; reinstall it")
    return pins


def _package_copy(into: Path) -> Path:
    """The ehrfm package as source only (no caches), to log as the model's code."""
    source = Path(ehrfm.__file__).resolve().parent
    return Path(shutil.copytree(source, into / "ehrfm", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")))


def _risk_model_copy(model_dir: Path, into: Path) -> Path:
    target = into / RISK_MODEL_ARTIFACT
    target.mkdir()
    for name in RISK_MODEL_FILES:
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir} is not a risk-model directory: {name} missing")
        shutil.copyfile(model_dir / name, target / name)
    return target


def log_risk_model(
    model_dir: str | Path,
    task: str,
    metrics: dict[str, float],
    card_markdown: str,
    input_example: pd.DataFrame | None = None,
) -> str:
    """Log the risk model in `model_dir` as a pyfunc with its card; returns the model URI.

    Logs into the active run, or a new run `register-<task>` when none is active. `metrics`
    (aggregates, e.g. val_auroc, test_auroc and their CI bounds) go to the run and the logged
    model. `input_example` (stored in the registry as is: never a real person's record) defaults
    to a made-up record built from the vocabulary.
    """
    model_dir = Path(model_dir)
    predictor = RiskPredictor.load(model_dir)  # refuse a directory that would not load when served
    if predictor.spec.task != task:
        raise ValueError(f"{model_dir} holds a model for task {predictor.spec.task!r}, not {task!r}")
    if input_example is None:
        input_example = records_frame([example_record(predictor)])
    run = nullcontext() if mlflow.active_run() else mlflow.start_run(run_name=f"register-{task}")
    with tempfile.TemporaryDirectory() as tmp, run:
        tmp = Path(tmp)
        card = tmp / MODEL_CARD_FILE
        card.write_text(card_markdown, encoding="utf-8")
        spec = predictor.spec
        risk_files = _risk_model_copy(model_dir, tmp)
        hashes = checksums.manifest(risk_files)  # of exactly the files uploaded
        info = mlflow.pyfunc.log_model(
            name="risk_model",
            python_model=registry_model.__file__,
            artifacts={RISK_MODEL_ARTIFACT: str(risk_files), "model_card": str(card)},
            code_paths=[str(_package_copy(tmp))],
            signature=pyfunc_signature(),
            input_example=input_example,
            pip_requirements=serving_requirements(),
            params={
                "task": task,
                "horizon_days": spec.horizon_days,
                "context": spec.context,
                "head_inputs": spec.head_inputs,
                "value_codes": len(spec.value_codes),
                "value_encoding": spec.value_encoding if spec.value_codes else "",
                "num_pgs": len(spec.pgs_ids),
                "tokenizer_version": spec.tokenizer_version,
                "calibrated": spec.platt is not None,
            },
            tags={"ehrfm.task": task, **checksums.tags(hashes)},
        )
        finite = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        if finite:
            mlflow.log_metrics(finite, model_id=info.model_id)
        mlflow.log_text(card_markdown, MODEL_CARD_FILE)
        mlflow.log_dict(
            {"model_id": info.model_id, "files": hashes, checksums.DIGEST_TAG: checksums.digest(hashes)},
            checksums.MANIFEST_FILE,
        )
        mlflow.set_tag("ehrfm.task", task)
    return info.model_uri


def _checksum_tags(model_uri: str) -> dict[str, str]:
    """The weight checksums to record for `model_uri`: those `log_risk_model` computed before the
    upload (tags of the logged model), else those of the risk-model files the store holds now."""
    match = re.fullmatch(r"models:/(m-[0-9a-f]+)", model_uri)
    if match is not None:
        recorded = mlflow.get_logged_model(match[1]).tags or {}
        if recorded.get(checksums.DIGEST_TAG) and recorded.get(checksums.MANIFEST_TAG):
            return {key: recorded[key] for key in (checksums.DIGEST_TAG, checksums.MANIFEST_TAG)}
    with tempfile.TemporaryDirectory(prefix="ehrfm-register-") as tmp:
        directory = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{model_uri}/artifacts/{RISK_MODEL_ARTIFACT}", dst_path=tmp
        )
        return checksums.tags(checksums.manifest(directory))


def _champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def register_if_better(model_uri: str, task: str, val_metric: float, metric_name: str = "val_auroc") -> dict[str, Any]:
    """Register `model_uri` as a new version of `ehrfm-<task>` (tagged with `metric_name` and the
    weights' SHA-256, which serving checks) and give it the `champion` alias only when `val_metric`
    beats the current champion's tag.

    Returns name, version, metric_name, metric, promoted, champion_version (after this call),
    previous_champion_version, previous_champion_metric and reason.
    """
    val_metric = float(val_metric)
    if not math.isfinite(val_metric):
        raise ValueError(f"{metric_name} must be a finite number to compare models")
    client = MlflowClient()
    name = registered_name(task)
    tags = {metric_name: repr(val_metric), "ehrfm.task": task, **_checksum_tags(model_uri)}
    version = mlflow.register_model(model_uri, name, tags=tags)
    champion = _champion(client, name)
    previous_metric = math.nan
    if champion is None:
        promoted, reason = True, "no champion yet"
    else:
        try:
            previous_metric = float(champion.tags[metric_name])
        except (KeyError, ValueError):
            previous_metric = math.nan
        if math.isnan(previous_metric):
            promoted, reason = False, f"champion version {champion.version} has no {metric_name} tag; alias left alone"
        elif val_metric > previous_metric:
            promoted, reason = True, f"{metric_name} {val_metric:.4f} > champion's {previous_metric:.4f}"
        else:
            promoted, reason = False, f"{metric_name} {val_metric:.4f} <= champion's {previous_metric:.4f}"
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    client.update_model_version(name, version.version, description=f"{metric_name}={val_metric:.4f}; {reason}")
    return {
        "name": name,
        "version": int(version.version),
        "metric_name": metric_name,
        "metric": val_metric,
        "promoted": promoted,
        "champion_version": int(version.version) if promoted else int(champion.version),
        "previous_champion_version": None if champion is None else int(champion.version),
        "previous_champion_metric": previous_metric,
        "reason": reason,
    }
