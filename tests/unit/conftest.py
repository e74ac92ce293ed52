"""Unit tests start nothing: a subprocess, a multiprocessing worker or ray.init during a unit test's
setup, call or teardown fails it with one line naming the rule (tests/support/layout.py)."""

from __future__ import annotations

import platform

import joblib
import pytest
import ray  # noqa: F401  (imported here so that refuse_processes can replace ray.init with a clear refusal)

from tests.support.layout import refuse_processes

# Two one-off probes of the machine that libraries make through a subprocess and then cache: done here,
# at collection, so that no unit test is charged with them. scikit-learn asks joblib for the physical core
# count (`lscpu`); importing mlflow asks for platform.platform() (`uname -p`).
joblib.cpu_count(only_physical_cores=True)
platform.platform()


def _refusing(item: pytest.Item):
    with refuse_processes(item.nodeid) as refused:
        result = yield
    if refused:  # refused, but the code under test swallowed the error: the test still fails
        pytest.fail(refused[0], pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _refusing(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _refusing(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    return (yield from _refusing(item))
