"""A job's entrypoint falls back to the checkout's copy of ehrfm when the package is not installed (a
fresh interpreter, in a subprocess)."""

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
