"""The `strnet` command line: a thin click layer over strnet's importable functions."""

from __future__ import annotations

import click

from strnet import __version__
from strnet.evaluate import eval_command
from strnet.predict import predict_command
from strnet.summary import summary_command
from strnet.train import train_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="strnet")
def main() -> None:
    """Train, evaluate and summarise two-stream, ST-ResNet, ST-ResNet* and STM-ResNet models."""


# Commands from other modules are registered below, one line each.
main.add_command(train_command)
main.add_command(eval_command)
main.add_command(summary_command)
main.add_command(predict_command)
