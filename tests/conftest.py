"""Shared fixtures: one local Ray cluster per test session, a real MLflow server, paths to the shared
sample data; and the layout rules of tests/support/layout.py, checked at collection and after each test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# the shared checks in tests/support fail with pytest's detailed assertion messages too
pytest.register_assert_rewrite("tests.support")

from tests.support.layout import check_layout, ray_is_initialized, stop_leaked_ray  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# Ray Train's controller polls its workers every 2 s and a worker's report waits for the poll that
# takes the one before (a queue of one); the tests' tiny runs report every few steps, so they poll
# every 0.5 s (about 15% off a short run). Set before any cluster starts, so every process inherits it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

# session fixtures shared by integration and e2e modules (expensive runs made once); DeepSpeed's CPU
# shared-memory op is never built (ehrfm.training.engine.skip_cpu_shared_memory_kernel)
pytest_plugins = ["tests.support.pretrain_runs"]


def pytest_collection_modifyitems(items):
    check_layout(items)  # one line per test in the wrong folder or without the marker its fixtures need


_RAY_WAS_UP = pytest.StashKey[bool]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[_RAY_WAS_UP] = ray_is_initialized()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    stop_leaked_ray(item, item.stash.get(_RAY_WAS_UP, True))
    return result


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the checkout (CI has it too); tests that need it fail loudly if absent."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared sample data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def serve_token_file(tmp_path_factory):
    """`ehrfm serve` run by a test (the pipeline's serve stage, `--smoke` in a subprocess) creates and
    reuses its bearer token file under the session's tmp dir, never in the user's ~/.ehrfm."""
    path = tmp_path_factory.mktemp("serve-token") / "serve_token"
    previous = os.environ.get("EHRFM_SERVE_TOKEN_FILE")
    os.environ["EHRFM_SERVE_TOKEN_FILE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("EHRFM_SERVE_TOKEN_FILE", None)
    else:
        os.environ["EHRFM_SERVE_TOKEN_FILE"] = previous


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole session (2 CPUs, no dashboard), shut down at the end."""
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if not ray.is_initialized():
        # address="local": always a fresh cluster of our own, never one that happens to be running.
        # Workers get the repo root on PYTHONPATH, so what a test ships them from tests.support imports
        # there too (Ray gives workers only the driver's working directory, whatever it is).
        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on loopback (SQLite + local artifacts), for the session."""
    import socket

    from ehrfm.tracking import ServerSettings, start_server

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = ServerSettings(state_dir=tmp_path_factory.mktemp("mlflow"), port=port)
    process = start_server(settings)
    yield settings.url
    process.terminate()
    process.wait(timeout=30)
