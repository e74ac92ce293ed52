"""SHA-256 of a risk-model directory, recorded in the registry and checked before serving.

Why: the registry's version number says *which* model a replica serves, but the files behind it
live in the artifact store, which other people and processes can write to. `log_risk_model`
hashes the files it uploads, `register_if_better` records the hashes as tags of the model
version (tags live in MLflow's backend store, not beside the files), and `model_store.load`
recomputes them on the downloaded copy and refuses a version whose files differ, or that has no
recorded checksum. Only file names and hex digests are recorded or reported, never contents.

- manifest: `{relative posix path: sha256 hex}` of every file under the directory;
- digest: SHA-256 of the manifest in `sha256sum` format (`<hex>  <path>\\n` per file, sorted by
  path), so `sha256sum -c` can check a copy by hand.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

DIGEST_TAG = "weights_sha256"  # the digest over the manifest
MANIFEST_TAG = "weights_manifest"  # the manifest as compact JSON
MANIFEST_FILE = "risk_model_sha256.json"  # the same, logged into the run for people to read
_CHUNK = 1 << 20


class WeightsChecksumError(RuntimeError):
    """A registered version whose files do not match (or lack) the checksum recorded for it."""


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def manifest(directory: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `directory` (symlinks are followed)."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return {p.relative_to(directory).as_posix(): file_sha256(p) for p in files}


def digest(files: dict[str, str]) -> str:
    """SHA-256 over the manifest in sha256sum format, sorted by path."""
    text = "".join(f"{files[name]}  {name}\n" for name in sorted(files))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tags(files: dict[str, str]) -> dict[str, str]:
    """What a model version records: the digest and the manifest (names and hashes only)."""
    return {DIGEST_TAG: digest(files), MANIFEST_TAG: json.dumps(files, sort_keys=True, separators=(",", ":"))}


def verify(directory: str | Path, recorded: dict[str, str], what: str) -> str:
    """Check `directory` against the tags `recorded` for it; returns the digest.

    Raises WeightsChecksumError naming `what` (e.g. `ehrfm-t2d version 3`) and the files that
    differ, are missing or were added; never their contents.
    """
    expected = recorded.get(DIGEST_TAG)
    if not expected:
        raise WeightsChecksumError(
            f"{what} has no {DIGEST_TAG} tag (registered before weight checksums, or not by "
            "register_if_better); refusing to serve it: register it again, or turn verification off deliberately"
        )
    try:
        expected_files = json.loads(recorded.get(MANIFEST_TAG) or "null")
    except ValueError:
        expected_files = None
    if not isinstance(expected_files, dict) or digest(expected_files) != expected:
        expected_files = None  # the digest alone decides; the manifest cannot name the files
    actual_files = manifest(directory)
    actual = digest(actual_files)
    if actual == expected:
        return actual
    if expected_files is None:
        detail = f"{DIGEST_TAG} differs (no consistent {MANIFEST_TAG} tag to name the files)"
    else:
        changed = sorted(n for n in expected_files.keys() & actual_files.keys() if expected_files[n] != actual_files[n])
        missing = sorted(expected_files.keys() - actual_files.keys())
        added = sorted(actual_files.keys() - expected_files.keys())
        parts = [
            f"{label}: {', '.join(names)}"
            for label, names in (("changed", changed), ("missing", missing), ("unexpected", added))
            if names
        ]
        detail = "; ".join(parts)
    raise WeightsChecksumError(
        f"{what}: the risk-model files do not match the SHA-256 recorded at registration ({detail}); refusing to serve it"
    )
