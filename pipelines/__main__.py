"""`python -m pipelines` runs the pipelines command line."""

from pipelines.cli import main

main()
