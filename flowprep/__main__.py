"""`python -m flowprep` runs the CLI."""

from flowprep.cli import main

main()
