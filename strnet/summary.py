"""`strnet summary MODEL`: parameters, multiply-adds and every stage's output size, as in Table 1.

Output sizes are printed as the paper writes them, W x H x T, C, so a reader can hold them against
Table 1 (e.g. conv5_x 7 x 7 x 11, 2048 and pool5 1 x 1 x 4 for ST-ResNet* on 11 chunks of 224^2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import click
import torch
from torch import nn

from strnet.layers import TemporalConv
from strnet.models import MODEL_NAMES, create_model, is_two_stream
from strnet.resnet import ResNet

STAGES = ("conv1", "pool1", "conv2_x", "conv3_x", "conv4_x", "conv5_x", "pool5", "fc")


@dataclass
class StageRow:
    """One line of the summary: a stream's stage and its output size."""

    stream: str
    stage: str
    width: int
    height: int
    chunks: int
    channels: int

    def size(self) -> str:
        return f"{self.width} x {self.height} x {self.chunks}, {self.channels}"


@torch.no_grad()
def stage_shapes(stream: ResNet, name: str, x: torch.Tensor) -> list[StageRow]:
    """Run one stream on (1, T, C, H, W) stage by stage; record each stage's output size."""
    t = x.shape[1]
    stream.set_chunks(t)
    rows = []

    def note(stage: str, h: torch.Tensor, chunks: int = t) -> None:
        rows.append(StageRow(name, stage, h.shape[-1], h.shape[-2], chunks, h.shape[-3]))

    h = stream.relu(stream.bn1(stream.conv1(x.flatten(0, 1))))
    note("conv1", h)
    h = stream.maxpool(h)
    note("pool1", h)
    for stage, layer in zip(STAGES[2:6], stream.stages, strict=True):
        for unit in layer:
            h = unit(h, t)
        note(stage, h)
    pooled = stream.pool5(h, 1, t)[0]  # (T', C, h', w')
    rows.append(StageRow(name, "pool5", pooled.shape[-1], pooled.shape[-2], *pooled.shape[:2]))
    scores = stream.fc(pooled.mean(dim=(-2, -1)))
    rows.append(StageRow(name, "fc", 1, 1, scores.shape[0], scores.shape[-1]))
    return rows


def count_macs(model: nn.Module, run: Callable[[], object]) -> int:
    """Multiply-adds of `model`'s convolutions and linear layers while `run()` executes."""
    total = 0

    def hook(module: nn.Module, args, out) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.weight[0].numel()  # in/groups * kh * kw
            total += out.numel() * k
        elif isinstance(module, TemporalConv):
            total += out.numel() * module.in_channels * module.kernel
        elif isinstance(module, nn.Linear):
            total += out.numel() * module.in_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | TemporalConv | nn.Linear)
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return total


def summarize(
    name: str,
    *,
    chunks: int = 11,
    height: int = 224,
    width: int = 224,
    num_classes: int = 101,
    base_width: int = 64,
    flow_stack: int = 10,
    in_channels: int = 3,
) -> dict:
    """Parameters, MACs per clip and per-stage output sizes of registry model `name`."""
    if is_two_stream(name):
        model = create_model(name, num_classes=num_classes, width=base_width, flow_stack=flow_stack)
        streams = {
            "appearance": (model.appearance, torch.zeros(1, chunks, 3, height, width)),
            "motion": (model.motion, torch.zeros(1, chunks, 2 * flow_stack, height, width)),
        }
    else:
        model = create_model(
            name, num_classes=num_classes, width=base_width, in_channels=in_channels
        )
        streams = {"stream": (model, torch.zeros(1, chunks, in_channels, height, width))}
    model.eval()
    rows: list[StageRow] = []

    def run() -> None:  # stage by stage; the streams' residual links add no multiply-adds
        for key, (net, x) in streams.items():
            rows.extend(stage_shapes(net, key, x))

    macs = count_macs(model, run)
    return {
        "name": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "macs": macs,
        "input": f"{chunks} chunks of {height} x {width}",
        "rows": rows,
    }


@click.command("summary")
@click.argument("model", type=click.Choice(MODEL_NAMES))
@click.option("--chunks", type=int, default=11, show_default=True, help="T temporal chunks.")
@click.option("--height", type=int, default=224, show_default=True, help="Input height.")
@click.option("--width", "frame_width", type=int, default=224, show_default=True,
              help="Input width.")  # fmt: skip
@click.option("--num-classes", type=int, default=101, show_default=True, help="K classes.")
@click.option("--base-width", type=int, default=64, show_default=True,
              help="Channels of conv1 (64 in the paper).")  # fmt: skip
@click.option("--flow-stack", type=int, default=10, show_default=True,
              help="L flows per motion input (2L channels).")  # fmt: skip
@click.option("--in-channels", type=int, default=3, show_default=True,
              help="Input channels of a single-stream model.")  # fmt: skip
def summary_command(model, chunks, height, frame_width, num_classes, base_width, flow_stack,
                    in_channels):  # fmt: skip
    """Print MODEL's parameters, multiply-adds and stage output sizes (W x H x T, C)."""
    if min(chunks, height, frame_width, num_classes, base_width, flow_stack, in_channels) < 1:
        raise click.UsageError("sizes and counts must be positive")
    try:
        s = summarize(
            model, chunks=chunks, height=height, width=frame_width, num_classes=num_classes,
            base_width=base_width, flow_stack=flow_stack, in_channels=in_channels,
        )  # fmt: skip
    except (ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from None
    click.echo(f"{s['name']}: {s['input']}")
    click.echo(f"parameters: {s['parameters']:,}")
    click.echo(f"multiply-adds per clip: {s['macs'] / 1e9:.2f} G")
    click.echo(f"{'stream':<11} {'stage':<8} output (W x H x T, C)")
    for r in s["rows"]:
        click.echo(f"{r.stream:<11} {r.stage:<8} {r.size()}")
