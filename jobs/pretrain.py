"""Submittable entrypoint: `python jobs/pretrain.py --help` (same as `ehrfm pretrain`)."""

import sys

from ehrfm.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("pretrain", sys.argv[1:]))
