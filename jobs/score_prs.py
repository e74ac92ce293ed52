"""Submittable entrypoint: `python jobs/score_prs.py --help` (same as `ehrfm score_prs`)."""

import sys

from ehrfm.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("score_prs", sys.argv[1:]))
