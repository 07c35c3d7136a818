"""`python -m lmforge.cli ...`: the `lmforge` command (as `python -m lmforge`)."""

from lmforge.cli import run

run()
