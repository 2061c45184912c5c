"""Model registry: short named constructors so configs say `name = "st_resnet50"`.

Single streams (`resnet50`, input channels chosen by the data: 3 RGB or 2L flow) and two-stream
models: `two_stream_resnet50` (late-fusion baseline), `st_resnet50` (eq. 2 + eq. 5),
`st_resnet50_star` (+ temporal max-pool), `stm_resnet50[_star]` (multiplicative residuals).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from strnet.resnet import DEPTHS, Bottleneck, resnet
from strnet.st_resnet import TwoStream

FLOW_STACK = 10  # L flows per motion input (Sec. 3.1)


def two_stream(
    depth: int,
    *,
    flow_stack: int = FLOW_STACK,
    spatiotemporal: bool = False,
    interaction: str = "additive",
    **stream_kw,
) -> TwoStream:
    """Appearance (3 channels) + motion (2L channels) streams of the same ResNet `depth`.

    `spatiotemporal` gives ST-ResNet: motion residuals and temporal convs; `interaction`
    "multiplicative" gives STM-ResNet; `stream_kw` go to both `ResNet`s (num_classes, width,
    bn_sub_batch, temporal_pool for ST-ResNet*).
    """
    if spatiotemporal and DEPTHS[depth][0] is not Bottleneck:
        raise ValueError(f"ST-ResNet needs a bottleneck ResNet (50/101/152), not depth {depth}")
    stream_kw.setdefault("num_classes", 101)
    appearance = resnet(depth, in_channels=3, temporal=spatiotemporal, **stream_kw)
    motion = resnet(depth, in_channels=2 * flow_stack, temporal=spatiotemporal, **stream_kw)
    return TwoStream(appearance, motion, motion_residuals=spatiotemporal, interaction=interaction)


def _registry() -> dict[str, Callable[..., nn.Module]]:
    reg: dict[str, Callable[..., nn.Module]] = {}
    for depth in (18, 34, 50, 101, 152):
        reg[f"resnet{depth}"] = partial(resnet, depth)  # in_channels: 3 RGB, 2L flow
        reg[f"two_stream_resnet{depth}"] = partial(two_stream, depth)
    for depth in (50, 101, 152):
        for prefix, interaction in (("st", "additive"), ("stm", "multiplicative")):
            st = partial(two_stream, depth, spatiotemporal=True, interaction=interaction)
            reg[f"{prefix}_resnet{depth}"] = st
            reg[f"{prefix}_resnet{depth}_star"] = partial(st, temporal_pool=True)
    return reg


REGISTRY = _registry()
MODEL_NAMES = tuple(REGISTRY)
TWO_STREAM_PREFIXES = ("two_stream_", "st_", "stm_")


def is_two_stream(name: str) -> bool:
    """Whether a registry name takes (rgb, flow) and returns per-stream scores."""
    return name.startswith(TWO_STREAM_PREFIXES)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registry model `name`; keyword arguments as in `resnet` / `two_stream`."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    return REGISTRY[name](**kwargs)
