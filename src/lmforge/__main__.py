"""`python -m lmforge ...` (and `torchrun --nproc_per_node=N -m lmforge train ...`): the `lmforge` command."""

from lmforge.cli import run

run()
