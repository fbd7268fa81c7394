"""`python -m helpers COMMAND ...`: the command line, the same as the installed `cifar10 COMMAND ...`
(helpers.cli.command_line)."""

from helpers.cli import run_command

run_command()
