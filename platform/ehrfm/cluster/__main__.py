"""`python -m ehrfm.cluster up|down|status|env` (what cluster/local.sh runs)."""

import sys

from ehrfm.cluster.cli import main

if __name__ == "__main__":
    sys.exit(main())
