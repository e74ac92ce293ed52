"""Submittable entrypoint: `python jobs/validate.py --help` (same as `ehrfm validate`)."""

import sys

from ehrfm.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("validate", sys.argv[1:]))
