"""Submittable entrypoint: `python jobs/preprocess.py --help` (same as `ehrfm preprocess`)."""

import sys

from ehrfm.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("preprocess", sys.argv[1:]))
