"""Model registry: short named constructors so configs say `name = "st_resnet50"`.

Single streams (`resnet50`, input channels chosen by the data: 3 RGB or 2L flow) and two-stream
models: `two_stream_resnet50` (late-fusion baseline), `st_resnet50` (eq. 2 + eq. 5),
`st_resnet50_star` (+ temporal max-pool on the conv5 map, window 5, stride 2) and `stm_resnet50`
(STM-ResNet as STMulNet.m: multiplicative gating, identity temporal convs, max-pool 5, stride 1).
3D ResNets `resnet3d18` / `resnet3d34` (Hara et al. 2017, `strnet.resnet3d`) take RGB clips
(B, 3, 16, 112, 112) and return (B, K). `create_model` checks its arguments and names the first
bad one in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from strnet.fusion import FUSION_ARGS, fusion_net
from strnet.layers import RESIDUAL_INPUTS
from strnet.resnet import DEPTHS, STM_TEMPORAL_POOL, TEMPORAL_POOL, Bottleneck, resnet
from strnet.resnet3d import DEPTHS3D, resnet3d
from strnet.st_resnet import TwoStream
from strnet.vgg import vgg

FLOW_STACK = 10  # L flows per motion input (Sec. 3.1)
KINDS = {  # two-stream kind -> (links, temporal convs, temporal pool)
    "late": (None, None, None),
    "st": ("additive", "inflate", None),
    "st_star": ("additive", "inflate", TEMPORAL_POOL),
    "stm": ("multiplicative", "insert", STM_TEMPORAL_POOL),
}


def two_stream(
    depth: int,
    *,
    kind: str = "late",
    flow_stack: int = FLOW_STACK,
    residual_input: str = "pre_relu",
    head_dropout: float = 0.0,
    **stream_kw,
) -> TwoStream:
    """Appearance (3 channels) + motion (2L channels) streams of the same ResNet `depth`.

    `kind`: "late" (two-stream baseline), "st" (ST-ResNet: motion residuals and inflated temporal
    convs), "st_star" (+ temporal max-pool), "stm" (STM-ResNet). `residual_input` is eq. 2's
    x_a: "pre_relu" (the authors') or "post_relu" (earlier strnet versions). `head_dropout`:
    dropout before the motion stream's classifier (the appearance stream has none: the authors'
    STMulNet.m sets 0.8 on the flow net's dropout layer only). `stream_kw` go to both `ResNet`s
    (num_classes, width, bn_sub_batch, stride_in_1x1).
    """
    links, temporal, pool = KINDS[kind]
    if temporal and DEPTHS[depth][0] is not Bottleneck:
        raise ValueError(f"ST-ResNet needs a bottleneck ResNet (50/101/152), not depth {depth}")
    stream_kw.setdefault("num_classes", 101)
    common = dict(temporal=temporal, temporal_pool=pool, **stream_kw)
    appearance = resnet(depth, in_channels=3, links=links, residual_input=residual_input, **common)
    motion = resnet(depth, in_channels=2 * flow_stack, head_dropout=head_dropout, **common)
    return TwoStream(appearance, motion)


STREAM_ARGS = ("num_classes", "width", "bn_sub_batch", "stride_in_1x1")
SINGLE_ARGS = (*STREAM_ARGS, "in_channels", "head_dropout")
TWO_STREAM_ARGS = (*STREAM_ARGS, "flow_stack")
LATE_ARGS = (*TWO_STREAM_ARGS, "head_dropout")  # head_dropout: the motion stream's
LINKED_ARGS = (*LATE_ARGS, "residual_input")
RESNET3D_ARGS = ("num_classes", "width", "in_channels")
FUSION_KEYS = FUSION_ARGS  # Two-Stream Fusion: fusion, fuse_at, truncate, ... (strnet.fusion)
VGG_FUSION_ARGS = ("num_classes", "width", "flow_stack", *FUSION_KEYS, "dropout", "motion_net")
VGG_ARGS = ("num_classes", "width", "in_channels", "dropout")
RESNET_FUSION_ARGS = (*TWO_STREAM_ARGS, *FUSION_KEYS)
CHECKED_BY_BUILDER = (*FUSION_KEYS, "dropout", "motion_net")  # strnet.fusion checks these


def _registry() -> dict[str, tuple[Callable[..., nn.Module], tuple[str, ...]]]:
    reg: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...]]] = {}
    for depth in (18, 34, 50, 101, 152):
        reg[f"resnet{depth}"] = (partial(resnet, depth), SINGLE_ARGS)  # 3 RGB, 2L flow
        reg[f"two_stream_resnet{depth}"] = (partial(two_stream, depth), LATE_ARGS)
    for depth in (50, 101, 152):
        reg[f"st_resnet{depth}"] = (partial(two_stream, depth, kind="st"), LINKED_ARGS)
        reg[f"st_resnet{depth}_star"] = (partial(two_stream, depth, kind="st_star"), LINKED_ARGS)
        reg[f"stm_resnet{depth}"] = (partial(two_stream, depth, kind="stm"), LINKED_ARGS)
    for depth in DEPTHS3D:  # 3D ResNets (Hara et al. 2017): clips (B, 3, 16, 112, 112) -> (B, K)
        reg[f"resnet3d{depth}"] = (partial(resnet3d, depth), RESNET3D_ARGS)
    for backbone in ("vggm2048", "vgg16"):  # Two-Stream Fusion (CVPR 2016), Sec. 3.1-3.5
        reg[backbone] = (partial(vgg, backbone), VGG_ARGS)  # one tower: 3 RGB or 2L flow
        reg[f"fusion_{backbone}"] = (partial(fusion_net, backbone), VGG_FUSION_ARGS)
    reg["fusion_resnet50"] = (partial(fusion_net, "resnet50"), RESNET_FUSION_ARGS)
    return reg


REGISTRY = _registry()
MODEL_NAMES = tuple(REGISTRY)
TWO_STREAM_PREFIXES = ("two_stream_", "st_", "stm_", "fusion_")


def is_two_stream(name: str) -> bool:
    """Whether a registry name takes (rgb, flow) and returns per-stream scores."""
    return name.startswith(TWO_STREAM_PREFIXES)


def is_3d(name: str) -> bool:
    """Whether a registry name is a 3D ResNet: clips (B, C, T, H, W) -> scores (B, K)."""
    return name.startswith("resnet3d")


def model_arguments(name: str) -> tuple[str, ...]:
    """The keyword arguments `create_model(name, ...)` accepts."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    return REGISTRY[name][1]


def check_arguments(name: str, kwargs: dict) -> None:
    """ValueError (one line) for the first unknown or bad keyword argument of model `name`."""
    known = REGISTRY[name][1]
    for key, value in kwargs.items():
        if key not in known:
            raise ValueError(f"{name}: unknown argument {key!r}; known: {', '.join(known)}")
        if (key == "bn_sub_batch" and value is None) or key in CHECKED_BY_BUILDER:
            continue
        if key == "stride_in_1x1":
            if not isinstance(value, bool):
                raise ValueError(f"{name}: stride_in_1x1 must be True or False, got {value!r}")
        elif key == "head_dropout":
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
                raise ValueError(f"{name}: head_dropout must be in [0, 1), got {value!r}")
        elif key == "residual_input":
            if value not in RESIDUAL_INPUTS:
                raise ValueError(
                    f"{name}: residual_input must be one of {', '.join(RESIDUAL_INPUTS)}, "
                    f"got {value!r}"
                )
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            extra = " or None" if key == "bn_sub_batch" else ""
            raise ValueError(f"{name}: {key} must be an integer >= 1{extra}, got {value!r}")


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registry model `name`; keyword arguments as in `resnet` / `two_stream`:

    all: num_classes, width, bn_sub_batch, stride_in_1x1 (False: torchvision's v1.5, stride on
    the 3x3 conv, what torchvision weights expect; True: the original v1 of Table 1); single
    streams: in_channels; two-stream: flow_stack; ST-/STM-ResNet: residual_input; ResNet single
    streams and the two-stream ResNets: head_dropout (the motion stream's).
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    check_arguments(name, kwargs)
    return REGISTRY[name][0](**kwargs)
