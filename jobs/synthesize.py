"""Submittable entrypoint: `python jobs/synthesize.py --help` (same as `ehrfm synthesize`)."""

import sys

from ehrfm.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("synthesize", sys.argv[1:]))
