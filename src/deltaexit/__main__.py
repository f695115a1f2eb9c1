"""``python -m deltaexit``: the command-line tool (see :mod:`deltaexit.cli`)."""

import sys

from deltaexit.cli import main

if __name__ == "__main__":
    sys.exit(main())
