"""`strnet summary MODEL`: parameters, multiply-adds and every stage's output size, as in Table 1.

Output sizes are printed as the paper writes them, W x H x T, C, so a reader can hold them against
Table 1 (e.g. conv5_x 7 x 7 x 11, 2048 and pool5 1 x 1 x 4 for ST-ResNet* on 11 chunks of 224^2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from strnet.layers import TemporalConv
from strnet.models import create_model, is_3d, is_two_stream, model_arguments
from strnet.resnet import ResNet


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


STAGE_MODULES = {  # summary row -> the stream's module whose output it reports
    "conv1": "relu",  # conv1 + BN + ReLU (the stream's own `relu` serves the stem only)
    "pool1": "maxpool",
    "conv2_x": "layer1",
    "conv3_x": "layer2",
    "conv4_x": "layer3",
    "conv5_x": "layer4",
    "pool5": "avgpool",
    "fc": "fc",
}


def stream_rows(stream: ResNet, name: str) -> tuple[list[StageRow], Callable[[], None]]:
    """Forward hooks that record `stream`'s stage outputs as rows while it runs; and a remover.

    The stages are ordinary modules, so the whole model runs as it does in training and the
    hooks read the (B, T, C, H, W) tensors between stages; pool5's T' follows temporal pooling.
    """
    rows: list[StageRow] = []
    handles = []

    def hook(stage: str):
        def record(module, args, out) -> None:
            if stage == "fc" or out.dim() <= 3:  # scores or vectors (bilinear fusion)
                chunks = out.shape[1] if out.dim() == 3 else 1
                rows.append(StageRow(name, stage, 1, 1, chunks, out.shape[-1]))
                return
            chunks = out.shape[1] if out.dim() == 5 else 1
            rows.append(StageRow(name, stage, out.shape[-1], out.shape[-2], chunks, out.shape[-3]))

        return record

    if hasattr(stream, "summary_modules"):  # VGG towers and fusion layers name their own rows
        targets = stream.summary_modules()
    else:
        targets = {stage: getattr(stream, attr) for stage, attr in STAGE_MODULES.items()}
    for stage, module in targets.items():
        if module is not None:  # a tower truncated after fusion lacks its later stages
            handles.append(module.register_forward_hook(hook(stage)))

    def remove() -> None:
        for h in handles:
            h.remove()

    return rows, remove


@torch.no_grad()
def stage_shapes(stream: ResNet, name: str, x: torch.Tensor) -> list[StageRow]:
    """Run one stream on (1, T, C, H, W); record each stage's output size (forward hooks)."""
    rows, remove = stream_rows(stream, name)
    try:
        stream(x)
    finally:
        remove()
    return rows


def count_macs(model: nn.Module, run: Callable[[], object]) -> int:
    """Multiply-adds of `model`'s convolutions and linear layers while `run()` executes."""
    total = 0

    def hook(module: nn.Module, args, out) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d | nn.Conv3d):
            k = module.weight[0].numel()  # in/groups * kh * kw
            total += out.numel() * k
        elif isinstance(module, TemporalConv):
            total += out.numel() * module.in_channels * module.kernel
        elif isinstance(module, nn.Linear):
            total += out.numel() * module.in_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Conv3d | TemporalConv | nn.Linear)
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
    stride_in_1x1: bool = False,
    model_kw: dict | None = None,
) -> dict:
    """Parameters, MACs per clip and per-stage output sizes of registry model `name`.

    `model_kw`: further `create_model` arguments (a fusion_* model's fusion, fuse_at, ...).

    The model runs one whole forward (a two-stream model with its motion links) while hooks
    record the multiply-adds of every conv and linear layer and the stages' output sizes.
    A 3D ResNet (`resnet3d*`) sees one clip of `chunks` frames (`summarize_3d`).
    """
    if is_3d(name):
        return summarize_3d(
            name, frames=chunks, height=height, width=width, num_classes=num_classes,
            base_width=base_width, in_channels=in_channels,
        )  # fmt: skip
    kw = dict(num_classes=num_classes, width=base_width, stride_in_1x1=stride_in_1x1)
    if "stride_in_1x1" not in model_arguments(name):  # VGG fusion towers
        kw.pop("stride_in_1x1")
    kw.update(model_kw or {})
    if is_two_stream(name):
        model = create_model(name, flow_stack=flow_stack, **kw)
        streams = {"appearance": model.appearance, "motion": model.motion}
        inputs = (
            torch.zeros(1, chunks, 3, height, width),
            torch.zeros(1, chunks, 2 * flow_stack, height, width),
        )
    else:
        model = create_model(name, in_channels=in_channels, **kw)
        streams = {"stream": model}
        inputs = (torch.zeros(1, chunks, in_channels, height, width),)
    model.eval()
    recorders = {key: stream_rows(net, key) for key, net in streams.items()}
    if hasattr(model, "summary_modules"):  # a fusion_* model: the fusion layer's output
        recorders["fusion"] = stream_rows(model, "fusion")

    def run() -> None:
        with torch.no_grad():
            model(*inputs)

    try:
        macs = count_macs(model, run)
    finally:
        for _, remove in recorders.values():
            remove()
    per_stream = {key: sum(p.numel() for p in net.parameters()) for key, net in streams.items()}
    total = sum(p.numel() for p in model.parameters())
    if total > sum(per_stream.values()):  # fusion layers and classifiers outside the towers
        per_stream["fusion"] = total - sum(per_stream.values())
    return {
        "name": name,
        "parameters": total,
        "stream_parameters": per_stream,
        "macs": macs,
        "input": f"{chunks} chunks of {height} x {width}",
        "rows": [row for rows, _ in recorders.values() for row in rows],
    }


# --- 3D ResNets (Hara et al. 2017): one clip (1, C, T, H, W), scores (1, K) ---
SIZES_3D = {"chunks": 16, "height": 112, "frame_width": 112, "num_classes": 400}  # Sec. 3.1


def clip_rows(model: nn.Module, name: str) -> tuple[list[StageRow], Callable[[], None]]:
    """`stream_rows` of a 3D ResNet, whose stages give (B, C, T, H, W) and whose fc (B, K)."""
    rows: list[StageRow] = []

    def hook(stage: str):
        def record(module, args, out) -> None:
            if out.dim() == 2:
                rows.append(StageRow(name, stage, 1, 1, 1, out.shape[1]))
            else:
                rows.append(StageRow(name, stage, *out.shape[:1:-1], out.shape[1]))

        return record

    handles = [
        getattr(model, attr).register_forward_hook(hook(stage))
        for stage, attr in STAGE_MODULES.items()
    ]
    return rows, lambda: [h.remove() for h in handles]


def summarize_3d(
    name: str, *, frames: int = 16, height: int = 112, width: int = 112, num_classes: int = 400,
    base_width: int = 64, in_channels: int = 3,
) -> dict:  # fmt: skip
    """`summarize` for a 3D ResNet: parameters, MACs and stage sizes (W x H x T, C) of a clip."""
    model = create_model(name, num_classes=num_classes, width=base_width, in_channels=in_channels)
    model.eval()
    rows, remove = clip_rows(model, "clip")
    x = torch.zeros(1, in_channels, frames, height, width)

    def run() -> None:
        with torch.no_grad():
            model(x)

    try:
        macs = count_macs(model, run)
    finally:
        remove()
    n = sum(p.numel() for p in model.parameters())
    return {
        "name": name, "parameters": n, "stream_parameters": {"clip": n}, "macs": macs,
        "input": f"1 clip of {frames} frames of {height} x {width}", "rows": rows,
    }  # fmt: skip
