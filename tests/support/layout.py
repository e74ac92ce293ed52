"""The rules that keep tests/ sorted by what a test really starts, enforced by tests/conftest.py and
tests/unit/conftest.py; every violation is reported as one line naming the test and the rule.

- tests/unit: no Ray, no MLflow server, no subprocess (`make test-fast` runs this folder only).
- tests/integration: real local Ray, a real MLflow server, DeepSpeed, subprocesses; minutes, not more.
- tests/e2e: the long end-to-end runs; a test is marked `e2e` if and only if it lives there.
- A test that uses the session's `ray_cluster` carries `@pytest.mark.ray`, one that uses the session's
  `mlflow_server` carries `@pytest.mark.mlflow`; a test not marked `ray` must not leave Ray running.
"""

from __future__ import annotations

import contextlib
import multiprocessing.process
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
ORDER = ("unit", "integration", "e2e")  # fast feedback first; unit tests also run before any Ray starts
UNIT_RULE = "tests/unit starts no Ray, no MLflow server and no subprocess: move the test to tests/integration"
FIXTURE_MARKERS = {"ray_cluster": "ray", "mlflow_server": "mlflow"}


class UnitRuleViolation(BaseException):
    """Raised where a unit test starts a process or Ray. A BaseException, so that product code that
    catches Exception cannot swallow it; the test fails on it either way (see refuse_processes)."""


def folder(item: pytest.Item) -> str:
    """The test's folder under tests/ ("unit", "integration", "e2e"), or "" outside them."""
    try:
        parts = Path(item.path).resolve().relative_to(TESTS).parts
    except ValueError:
        return ""
    return parts[0] if len(parts) > 1 else ""


def layout_problems(item: pytest.Item) -> list[str]:
    """What is wrong with where and how `item` is declared (checked at collection)."""
    marks = {mark.name for mark in item.iter_markers()}
    where = folder(item)
    problems = []
    for fixture, marker in FIXTURE_MARKERS.items():
        if fixture in item.fixturenames:
            if where == "unit":
                problems.append(f"uses the `{fixture}` fixture: {UNIT_RULE}")
            elif marker not in marks:
                problems.append(f"uses the `{fixture}` fixture but is not marked @pytest.mark.{marker}")
    if where == "unit" and marks & {"ray", "mlflow"}:
        problems.append(f"is marked {sorted(marks & {'ray', 'mlflow'})}: {UNIT_RULE}")
    if ("e2e" in marks) != (where == "e2e"):
        problems.append(
            "is marked e2e outside tests/e2e" if "e2e" in marks else "lives in tests/e2e without @pytest.mark.e2e"
        )
    if where not in ORDER:
        problems.append("lives outside tests/unit, tests/integration and tests/e2e")
    return problems


def check_layout(items: list[pytest.Item]) -> None:
    """Fail collection with one line per offending test, and run unit tests first, e2e last."""
    offenders = [f"{item.nodeid} {problem}" for item in items for problem in layout_problems(item)]
    if offenders:
        raise pytest.UsageError(
            f"tests/ layout: {len(offenders)} problem(s) (rules: tests/support/layout.py)\n" + "\n".join(offenders)
        )
    items.sort(key=lambda item: ORDER.index(folder(item)) if folder(item) in ORDER else len(ORDER))


def ray_is_initialized() -> bool:
    ray = sys.modules.get("ray")  # never imports Ray for a run that has not
    return ray is not None and ray.is_initialized()


def stop_leaked_ray(item: pytest.Item, ray_was_up: bool) -> None:
    """After a test's teardown: a test not marked `ray` that left Ray running fails (and Ray is stopped,
    so the next tests start from what they expect)."""
    if ray_was_up or item.get_closest_marker("ray") is not None or not ray_is_initialized():
        return
    sys.modules["ray"].shutdown()
    pytest.fail(f"{item.nodeid} left Ray initialized but is not marked @pytest.mark.ray", pytrace=False)


@contextlib.contextmanager
def refuse_processes(nodeid: str) -> Iterator[list[str]]:
    """While active: starting a subprocess (subprocess, os.system/fork/posix_spawn, multiprocessing) or
    calling ray.init raises UnitRuleViolation; yields the list of what was refused."""
    refused: list[str] = []

    def refuse(what: str):
        def refused_call(*args, **kwargs):
            shown = args[1] if what == "subprocess" and len(args) > 1 else (args[0] if args else "")
            reason = f"{nodeid} {what}({str(shown)[:80]}): {UNIT_RULE}"
            refused.append(reason)
            raise UnitRuleViolation(reason)

        return refused_call

    patches = [
        (subprocess.Popen, "_execute_child", refuse("subprocess")),
        (multiprocessing.process.BaseProcess, "start", refuse("multiprocessing.Process.start")),
        *[(os, name, refuse(f"os.{name}")) for name in ("system", "fork", "posix_spawn", "posix_spawnp")],
    ]
    ray = sys.modules.get("ray")  # imported by tests/unit/conftest.py; Ray's own start is a subprocess anyway
    if ray is not None and hasattr(ray, "init"):
        patches.append((ray, "init", refuse("ray.init")))  # what Ray Data/Train/Serve call to start a local Ray
    with pytest.MonkeyPatch.context() as patch:
        for owner, name, replacement in patches:
            patch.setattr(owner, name, replacement)
        yield refused
