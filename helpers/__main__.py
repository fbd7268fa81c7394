"""`python -m helpers ...`: the command line (helpers.cli), the same as `python -m helpers.train ...`."""

from helpers.cli import main
from helpers.distributed import exit_process

exit_process(main())
