"""Pretraining runs shared by tests/integration and tests/e2e (a pytest plugin: tests/conftest.py).

Session-scoped, so the ZeRO-3 reference run is trained once for the whole suite: the integration
module checks it learns, the e2e module resumes and kills runs against its curve. Test modules
alias `timelines`, `storage` and `datasets` to these under their own names.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.pretrain_setup import make_config, pretraining_runner
from tests.support.timeline_factory import write_timelines


@pytest.fixture(scope="session")
def pretrain_timelines(tmp_path_factory):
    return write_timelines(tmp_path_factory.mktemp("pretrain-data"), persons=400, files=2)


@pytest.fixture(scope="session")
def pretrain_storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pretrain-runs")


@pytest.fixture(scope="session")
def pretrain_datasets(ray_cluster, pretrain_timelines, pretrain_storage):
    from ehrfm.training.pretrain import load_datasets

    return load_datasets(make_config(pretrain_timelines, pretrain_storage, []))


@pytest.fixture(scope="session")
def pretrain(pretrain_datasets, pretrain_timelines, pretrain_storage, mlflow_server):
    """Run (or resume) a pretraining run named `name`; returns (result, final train_state)."""
    return pretraining_runner(pretrain_datasets, pretrain_timelines, pretrain_storage, mlflow_server)


@pytest.fixture(scope="session")
def cross_zero3(pretrain):
    return pretrain("cross-zero3", "deepspeed.zero_stage=3", "model.fusion=cross")
