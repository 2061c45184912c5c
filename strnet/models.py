"""Model registry: short named constructors so configs say `name = "st_resnet50"`.

Single streams (`resnet50`, input channels chosen by the data: 3 RGB or 2L flow) and two-stream
models: `two_stream_resnet50` (late-fusion baseline), `st_resnet50` (eq. 2 + eq. 5),
`st_resnet50_star` (+ temporal max-pool), `stm_resnet50[_star]` (multiplicative residuals).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from strnet.resnet import DEPTHS, Bottleneck, ResNet, resnet
from strnet.st_resnet import TwoStream

FLOW_STACK = 10  # L flows per motion input (Sec. 3.1)


def single_stream(
    depth: int,
    *,
    num_classes: int = 1000,
    in_channels: int = 3,
    width: int = 64,
    bn_sub_batch: int | None = None,
) -> ResNet:
    """A 2D ResNet stream; `in_channels` 3 for RGB, 2L for a flow stack."""
    return resnet(
        depth,
        num_classes=num_classes,
        in_channels=in_channels,
        width=width,
        bn_sub_batch=bn_sub_batch,
    )


def two_stream(
    depth: int,
    *,
    num_classes: int = 101,
    flow_stack: int = FLOW_STACK,
    width: int = 64,
    bn_sub_batch: int | None = None,
    spatiotemporal: bool = False,
    temporal_pool: bool = False,
    interaction: str = "additive",
) -> TwoStream:
    """Appearance (3 channels) + motion (2L channels) streams of the same ResNet `depth`.

    `spatiotemporal` gives ST-ResNet: motion residuals and temporal convs; `temporal_pool`
    ST-ResNet*'s max-pool over chunks; `interaction` "multiplicative" gives STM-ResNet.
    """
    if spatiotemporal and DEPTHS[depth][0] is not Bottleneck:
        raise ValueError(f"ST-ResNet needs a bottleneck ResNet (50/101/152), not depth {depth}")

    def stream(in_channels: int) -> ResNet:
        return resnet(
            depth,
            num_classes=num_classes,
            in_channels=in_channels,
            width=width,
            bn_sub_batch=bn_sub_batch,
            temporal=spatiotemporal,
            temporal_pool=temporal_pool,
        )

    return TwoStream(
        stream(3), stream(2 * flow_stack), motion_residuals=spatiotemporal, interaction=interaction
    )


def _registry() -> dict[str, Callable[..., nn.Module]]:
    reg: dict[str, Callable[..., nn.Module]] = {}

    def bind(fn, depth, **fixed):
        def build(**kw):
            return fn(depth, **fixed, **kw)

        return build

    for depth in (18, 34, 50, 101, 152):
        reg[f"resnet{depth}"] = bind(single_stream, depth)
        reg[f"two_stream_resnet{depth}"] = bind(two_stream, depth)
    for depth in (50, 101, 152):
        for prefix, interaction in (("st", "additive"), ("stm", "multiplicative")):
            st = dict(spatiotemporal=True, interaction=interaction)
            reg[f"{prefix}_resnet{depth}"] = bind(two_stream, depth, **st)
            reg[f"{prefix}_resnet{depth}_star"] = bind(two_stream, depth, temporal_pool=True, **st)
    return reg


REGISTRY = _registry()
MODEL_NAMES = tuple(REGISTRY)
TWO_STREAM_PREFIXES = ("two_stream_", "st_", "stm_")


def is_two_stream(name: str) -> bool:
    """Whether a registry name takes (rgb, flow) and returns per-stream scores."""
    return name.startswith(TWO_STREAM_PREFIXES)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registry model `name`; keyword arguments as in `single_stream`/`two_stream`."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    return REGISTRY[name](**kwargs)
