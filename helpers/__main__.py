"""`python -m helpers ...`: the command line (helpers.cli), the same as `python -m helpers.train ...`."""

import sys

from helpers.cli import main

sys.exit(main())
