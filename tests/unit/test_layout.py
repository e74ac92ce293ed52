"""The layout rules of tests/support/layout.py: what a unit test may not start, and what collection refuses."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray

from tests.support.layout import TESTS, UNIT_RULE, UnitRuleViolation, layout_problems, refuse_processes


def test_a_subprocess_multiprocessing_or_ray_init_is_refused_naming_the_rule():
    with refuse_processes("tests/unit/test_x.py::test_y") as refused:
        with pytest.raises(UnitRuleViolation, match="subprocess.*tests/unit starts no Ray"):
            subprocess.run([sys.executable, "-c", "pass"], check=False)
        with pytest.raises(UnitRuleViolation, match=r"multiprocessing\.Process\.start"):
            multiprocessing.get_context("spawn").Process(target=print).start()
        with pytest.raises(UnitRuleViolation, match=r"ray\.init"):
            ray.init(num_cpus=1)
    assert len(refused) == 3 and all(r.startswith("tests/unit/test_x.py::test_y ") for r in refused)
    assert not ray.is_initialized()


def test_the_refusal_is_one_line_and_not_an_exception_product_code_can_swallow():
    with refuse_processes("t") as refused, pytest.raises(UnitRuleViolation):
        try:
            subprocess.run(["true"], check=False)
        except Exception:  # what a library's fallback would catch
            pytest.fail("swallowed")
    assert "\n" not in refused[0] and refused[0].endswith(UNIT_RULE)


def item(folder: str, marks=(), fixtures=()) -> SimpleNamespace:
    path = TESTS / folder / "test_x.py" if folder else TESTS / "test_x.py"
    return SimpleNamespace(
        path=Path(path),
        fixturenames=list(fixtures),
        iter_markers=lambda: [SimpleNamespace(name=m) for m in marks],
    )


@pytest.mark.parametrize(
    "folder, marks, fixtures, problems",
    [
        ("unit", (), (), []),
        ("integration", ("ray",), ("ray_cluster",), []),
        ("integration", ("ray", "mlflow"), ("ray_cluster", "mlflow_server"), []),
        ("e2e", ("e2e",), (), []),
        ("integration", (), ("ray_cluster",), ["not marked @pytest.mark.ray"]),
        ("integration", ("ray",), ("mlflow_server",), ["not marked @pytest.mark.mlflow"]),
        ("unit", (), ("ray_cluster",), ["uses the `ray_cluster` fixture: " + UNIT_RULE]),
        ("unit", ("ray",), (), ["is marked ['ray']: " + UNIT_RULE]),
        ("integration", ("e2e",), (), ["is marked e2e outside tests/e2e"]),
        ("e2e", (), (), ["lives in tests/e2e without @pytest.mark.e2e"]),
        ("", (), (), ["lives outside tests/unit, tests/integration and tests/e2e"]),
    ],
)
def test_layout_problems_name_the_broken_rule(folder, marks, fixtures, problems):
    found = layout_problems(item(folder, marks, fixtures))
    assert len(found) == len(problems) and all(p in f for p, f in zip(problems, found))
