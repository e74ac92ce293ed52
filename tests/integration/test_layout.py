"""The session's Ray workers import what tests ship them from tests.support (the repo root reaches them through
the `ray_cluster` fixture's runtime_env, whatever the working directory of the pytest run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.layout import TESTS


@pytest.mark.ray
def test_ray_workers_import_the_test_support_package(ray_cluster):
    @ray_cluster.remote
    def support_file() -> str:
        import tests.support.timeline_factory

        return tests.support.timeline_factory.__file__

    assert Path(ray_cluster.get(support_file.remote())) == TESTS / "support" / "timeline_factory.py"
