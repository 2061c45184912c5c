"""The `flowprep` command line: a thin click layer over importable functions.

Each command parses options, calls a function from its own module and reports; no logic lives here.
"""

from __future__ import annotations

import click

from flowprep import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flowprep")
def main() -> None:
    """Prepare action-recognition videos: manifests, RGB frames, TV-L1 flow, shards."""


# Commands from other modules are registered below, one line each.
