"""Find and load the model a replica serves: resolve `models:/<name>@<alias>` to a version
number, download that version's risk-model directory and build a RiskPredictor from it, so
serving tokenizes and scores with exactly the code and artifacts the registry holds.

The alias is resolved once, to a number, and that number is loaded (`models:/<name>/<n>`): an
alias moving during the download cannot mix two versions, and every response can name the
version that scored it. The downloaded files must match the SHA-256 recorded on that version at
registration (`ehrfm.mlops.checksums`), else loading fails and the replica never serves them.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ehrfm.mlops import checksums
from ehrfm.mlops.pyfunc_model import RISK_MODEL_ARTIFACT, example_record
from ehrfm.transfer.predictor import RiskPredictor

logger = logging.getLogger(__name__)

LOCAL_VERSION = "local"
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ModelRef:
    """One concrete model: registry name + version number, or a local directory."""

    name: str
    version: str
    alias: str | None = None
    local_dir: str | None = None

    @property
    def version_uri(self) -> str:
        return self.local_dir or f"models:/{self.name}/{self.version}"


def parse_registry_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of `models:/<name>@<alias>` or `models:/<name>/<n>`."""
    match = _REGISTRY_URI.match(uri)
    if match is None:
        raise ValueError(f"model_uri {uri!r} is neither models:/<name>@<alias> nor models:/<name>/<version>")
    return match["name"], match["alias"], match["version"]


def resolve(model_uri: str, pinned_version: str | None = None) -> ModelRef:
    """The concrete model `model_uri` names now (`pinned_version` wins over the alias)."""
    if not model_uri.startswith("models:/"):
        directory = Path(model_uri.removeprefix("file://")).resolve()
        if not directory.is_dir():
            raise FileNotFoundError(f"model_uri {model_uri!r}: no such risk-model directory")
        return ModelRef(name=directory.name, version=LOCAL_VERSION, local_dir=str(directory))
    name, alias, version = parse_registry_uri(model_uri)
    if pinned_version is not None:
        return ModelRef(name, str(pinned_version), alias)
    if version is not None:
        return ModelRef(name, version)
    from mlflow import MlflowClient

    return ModelRef(name, str(MlflowClient().get_model_version_by_alias(name, alias).version), alias)


def _registry_tags(ref: ModelRef) -> dict[str, str]:
    from mlflow import MlflowClient

    return dict(MlflowClient().get_model_version(ref.name, ref.version).tags or {})


def _registry_metrics(tags: dict[str, str]) -> dict[str, float]:
    """Numeric tags of the registered version (the metric it was registered with)."""
    metrics = {}
    for key, value in tags.items():
        if key in (checksums.DIGEST_TAG, checksums.MANIFEST_TAG):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            metrics[key] = number
    return metrics


@dataclass
class LoadedModel:
    """A predictor plus where it came from; replaced as a whole when the version changes."""

    ref: ModelRef
    predictor: RiskPredictor
    metrics: dict[str, float] = field(default_factory=dict)
    loaded_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))

    def info(self) -> dict[str, Any]:
        """What GET /v1/model reports: aggregates only."""
        spec = self.predictor.spec
        return {
            "name": self.ref.name,
            "version": self.ref.version,
            "alias": self.ref.alias,
            "task": spec.task,
            "horizon_days": spec.horizon_days,
            "context": spec.context,
            "history_windows": spec.history_windows,
            "head_inputs": spec.head_inputs,
            "value_codes": len(spec.value_codes),
            "pgs_ids": list(spec.pgs_ids),
            "min_prs_share": self.predictor.min_prs_share,
            "calibrated": spec.platt is not None,
            "tokenizer_version": spec.tokenizer_version,
            "metrics": {k: float(v) for k, v in {**spec.metrics, **self.metrics}.items() if math.isfinite(float(v))},
            "loaded_at": self.loaded_at,
        }


def load(ref: ModelRef, min_prs_share: float, *, verify_weights: bool = True) -> LoadedModel:
    """Download (registry) or open (local) the risk-model directory and load it; a made-up
    canary person must score to a finite probability before the model is handed out.

    A registry version's downloaded files must match the `weights_sha256` / `weights_manifest`
    tags recorded at registration (checksums.WeightsChecksumError naming the version and the
    files otherwise, also when the version has no such tag). `verify_weights=False` skips the
    check (logged as a warning); local directories are never checked.
    """
    if ref.local_dir is not None:
        loaded = LoadedModel(ref, RiskPredictor.load(ref.local_dir, min_prs_share=min_prs_share))
    else:
        import mlflow

        tags = _registry_tags(ref)  # from the backend store, before anything is downloaded
        what = f"model {ref.name} version {ref.version}"
        with tempfile.TemporaryDirectory(prefix="ehrfm-serve-") as tmp:
            directory = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{ref.version_uri}/artifacts/{RISK_MODEL_ARTIFACT}", dst_path=tmp
            )
            if verify_weights:
                checksums.verify(directory, tags, what)
            else:
                logger.warning("%s: weight checksum verification is off (verify_weights=False)", what)
            predictor = RiskPredictor.load(directory, min_prs_share=min_prs_share)  # reads every file into memory
        loaded = LoadedModel(ref, predictor, _registry_metrics(tags))
    [canary] = loaded.predictor.predict([example_record(loaded.predictor)])
    if not 0.0 <= canary["risk"] <= 1.0:
        raise RuntimeError(f"{ref.version_uri}: the canary record scored {canary['risk']!r}, not a probability")
    return loaded
