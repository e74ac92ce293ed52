"""Submittable entrypoint: `python jobs/tune.py --help` (same as `ehrfm tune`)."""

import sys
from pathlib import Path

try:
    from ehrfm.cli import run_command
except ImportError:  # not installed: use the copy beside this file (`ray job submit --working-dir .`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
    from ehrfm.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("tune", sys.argv[1:]))
