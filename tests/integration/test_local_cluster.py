"""The local multi-node launcher: a real 2-node Ray cluster (head + 1 worker) with token auth.

The cluster lives in its own short temp dir with non-default ports, so it never touches the test
session's `ray_cluster` or the user's ~/.ray/auth_token, and `down` stops only its own processes.
Jobs are submitted the documented way: `ray job submit --working-dir . --runtime-env
cluster/runtime_env.yaml -- python ...` from the repository root; the pretraining job gets the
session's real MLflow server through MLFLOW_TRACKING_URI in the runtime env's env_vars.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


FALLBACK_PROBE = """
import runpy, sys
from pathlib import Path
installed = str(Path(sys.argv[1]).resolve())
sys.path[:] = [p for p in sys.path if str(Path(p or '.').resolve()) != installed]
job, sys.argv = sys.argv[2], [sys.argv[2], '--help']
try:
    runpy.run_path(job, run_name='__main__')
finally:
    print('EHRFM_FROM', sys.modules['ehrfm'].__file__)
"""


def test_job_entrypoint_falls_back_to_the_checkout_copy_when_not_installed(tmp_path):
    """`jobs/*.py` import `ehrfm` from <their repo>/platform when it is not importable otherwise."""
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO_ROOT / "jobs", checkout / "jobs")
    shutil.copytree(
        REPO_ROOT / "platform" / "ehrfm", checkout / "platform" / "ehrfm", ignore=shutil.ignore_patterns("__pycache__")
    )
    job = checkout / "jobs" / "pipeline.py"
    done = subprocess.run(
        [sys.executable, "-c", FALLBACK_PROBE, str(REPO_ROOT / "platform"), str(job)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage: ehrfm pipeline" in done.stdout
    assert f"EHRFM_FROM {checkout / 'platform' / 'ehrfm' / '__init__.py'}" in done.stdout
