"""The `strnet` command line: a thin click layer over strnet's importable functions."""

from __future__ import annotations

import click

from strnet import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="strnet")
def main() -> None:
    """Train and evaluate two-stream, ST-ResNet and 3D ResNet models."""


# Commands from other modules are registered below, one line each.
