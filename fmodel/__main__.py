"""`python -m fmodel ...`: the `fmodel` command line (see `fmodel.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
