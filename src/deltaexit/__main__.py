import sys

from deltaexit.cli import main

sys.exit(main())
