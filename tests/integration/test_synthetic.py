"""The synthetic cohort written by Ray tasks on the session's cluster is byte-identical to the in-process one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ehrfm_synthetic.cohort import main


def _generate(out: Path, *extra: str) -> dict:
    assert main(["--out", str(out), *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small")
    _generate(out, "--persons", "300", "--seed", "5", "--chunk-size", "120", "--num-pgs", "8")
    return out


@pytest.mark.ray
def test_ray_tasks_write_the_same_bytes_as_in_process(small, tmp_path, ray_cluster):
    _generate(tmp_path / "ray", "--persons", "300", "--seed", "5", "--chunk-size", "120", "--num-pgs", "8", "--ray")
    assert _files(tmp_path / "ray") == _files(small)
