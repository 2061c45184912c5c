"""Activation memory of `TemporalConv` for backward: before (taps concatenated) vs now (shift-add).

Before 2026-12-02 a 1x1x3 temporal conv replicate-padded the clip in time, concatenated the three
shifted copies along channels and ran one 1x1 conv on that: autograd kept the 3x-channel tensor
for backward. Now one 1x1 conv computes the three taps as output channels and a shift-add sums
them; autograd keeps only the conv's input, which the layer before keeps anyway.

Measured with `torch.autograd.graph.saved_tensors_hooks`: the bytes of the distinct storages
autograd saves during a forward pass (what stays alive until backward), for every temporal conv
of an ST-ResNet-50 stream and for the whole stream, at 224 x 224 with T = 5 chunks (Table 2's
ST-ResNet phase), batch 1, float32; plus the time of forward + backward (best of `--repeat`).

    python benchmarks/temporal_conv.py               # 224^2, T = 5, width 64 (the paper's sizes)
    python benchmarks/temporal_conv.py --size 112 --width 16   # quick check
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import click
import torch
import torch.nn.functional as F

from strnet.layers import TemporalConv, as_clips
from strnet.resnet import resnet


def concatenated_taps_forward(self: TemporalConv, x: torch.Tensor) -> torch.Tensor:
    """The implementation before 2026-12-02 (replicate padding only), on a clip batch."""
    clip = as_clips(x)
    b, t, c, h, w = clip.shape
    half = self.kernel // 2
    idx = torch.arange(-half, t + half, device=x.device).clamp_(0, t - 1)
    padded = clip.index_select(1, idx)
    taps = torch.cat([padded[:, k : k + t] for k in range(self.kernel)], dim=2)
    weight = self.weight.permute(0, 2, 1, 3, 4).reshape(self.out_channels, -1, 1, 1)
    out = F.conv2d(taps.reshape(b * t, self.kernel * c, h, w), weight)
    return out.view(b, t, self.out_channels, h, w) if x.dim() == 5 else out


@contextmanager
def implementation(kind: str):
    """Swap `TemporalConv.forward` for the old one while the block runs ("before")."""
    current = TemporalConv.forward
    if kind == "before":
        TemporalConv.forward = concatenated_taps_forward
    try:
        yield
    finally:
        TemporalConv.forward = current


@contextmanager
def saved_bytes(params: set[int], out: dict):
    """Sum the bytes of the distinct activation storages autograd saves inside the block
    (parameters and the reshaped temporal filters, (k * out, in, 1, 1), are not counted)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        weight = t.dim() == 4 and t.shape[-2:] == (1, 1)  # a reshaped 1x1 filter, not activation
        if storage.data_ptr() not in params and not weight:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
    out["bytes"] = sum(seen.values())


def measure(kind: str, size: int, chunks: int, width: int, repeat: int) -> dict:
    torch.manual_seed(0)
    net = resnet(50, num_classes=101, width=width, temporal=True).train()
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    clip = torch.randn(1, chunks, 3, size, size)
    convs = [m for m in net.modules() if isinstance(m, TemporalConv)]
    result = {"convs": 0, "stream": 0, "seconds": float("inf")}
    with implementation(kind):
        inputs: dict[int, torch.Tensor] = {}
        handles = [
            m.register_forward_hook(lambda m, a, o: inputs.__setitem__(id(m), a[0].detach()))
            for m in convs
        ]
        with torch.no_grad():
            net(clip)
        for h in handles:
            h.remove()
        for m in convs:  # each temporal conv alone, on the activation it sees in the stream
            x = inputs[id(m)].requires_grad_(True)
            counted: dict = {}
            with saved_bytes(params | {x.untyped_storage().data_ptr()}, counted):
                m(x)
            result["convs"] += counted["bytes"]
        counted = {}
        with saved_bytes(params, counted):
            net(clip)
        result["stream"] = counted["bytes"]
        for _ in range(repeat):
            start = time.perf_counter()
            net(clip).sum().backward()
            result["seconds"] = min(result["seconds"], time.perf_counter() - start)
            net.zero_grad(set_to_none=True)
    return result


@click.command()
@click.option("--size", default=224, show_default=True, help="Frame side.")
@click.option("--chunks", default=5, show_default=True, help="T chunks per clip.")
@click.option("--width", default=64, show_default=True, help="conv1 channels (64 = ResNet-50).")
@click.option("--repeat", default=3, show_default=True, help="Timed forward+backward passes.")
def main(size: int, chunks: int, width: int, repeat: int) -> None:
    """Print saved-for-backward bytes of the temporal convs and the stream, before vs now."""
    rows = {kind: measure(kind, size, chunks, width, repeat) for kind in ("before", "now")}
    mib = 2**20
    click.echo(f"ST-ResNet-50 stream, width {width}, 1 clip of {chunks} x {size}^2, float32")
    click.echo("impl    temporal convs (MiB)  whole stream (MiB)  fwd+bwd (s)")
    for kind, r in rows.items():
        click.echo(
            f"{kind:7s} {r['convs'] / mib:20.1f}  {r['stream'] / mib:18.1f}  {r['seconds']:11.2f}"
        )
    b, n = rows["before"], rows["now"]
    click.echo(
        f"temporal convs: {n['convs'] / max(b['convs'], 1):.3f}x; "
        f"whole stream: {n['stream'] / b['stream']:.3f}x of before"
    )


if __name__ == "__main__":
    main()
