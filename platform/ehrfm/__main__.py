"""`python -m ehrfm` is the same as the `ehrfm` console script."""

import sys

from ehrfm.cli import main

if __name__ == "__main__":
    sys.exit(main())
