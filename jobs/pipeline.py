"""Submittable entrypoint: `python jobs/pipeline.py --help` (same as `ehrfm pipeline`)."""

import sys

from ehrfm.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("pipeline", sys.argv[1:]))
