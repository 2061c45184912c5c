"""`python -m strnet` runs the CLI (what `torchrun -m strnet train ...` starts on every rank)."""

from strnet.cli import main

main()
