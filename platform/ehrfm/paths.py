"""Paths in configs: local directories made absolute (Ray workers run elsewhere), URIs left alone."""

from __future__ import annotations

from pathlib import Path


def is_uri(path: str) -> bool:
    """s3://, gs://, file:// ... (anything pyarrow's filesystems or MLflow resolve themselves)."""
    return "://" in path


def absolute_path(path: str) -> str:
    """A local path made absolute (`~` expanded) so every Ray worker finds it; a URI unchanged."""
    return path if is_uri(path) else str(Path(path).expanduser().resolve())
