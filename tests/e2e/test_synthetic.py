"""The default synthetic cohort (20,000 persons) meets its calibration targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ehrfm_synthetic.cohort import main


def _generate(out: Path, *extra: str) -> dict:
    assert main(["--out", str(out), *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.e2e
def test_default_cohort_meets_the_calibration_targets(tmp_path):
    figures = _generate(tmp_path / "default", "--persons", "20000", "--seed", "0")["figures"]
    assert 0.03 <= figures["prevalence"] <= 0.10
    assert figures["oracle_auroc_gap"] >= 0.06
    assert figures["vocabulary_size"] >= 1000
