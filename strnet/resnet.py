"""ResNet-18/34/50/101/152 with torchvision's state_dict keys, fully convolutional over chunks.

One configurable class serves the 2D streams of the two-stream baseline and the streams of
ST-ResNet (Table 1) and STM-ResNet (STMulNet.m). Where things go is decided in one place each:

- `TEMPORAL_UNIT`: the unit of every stage with temporal convs. `temporal="inflate"` (ST-ResNet)
  turns its two 1x1 convs into 1x1x3 convs (eq. 5); `temporal="insert"` (STM-ResNet) keeps them
  2D and adds a new 1x1x3 C -> C conv after its 3x3 conv, initialised as the identity.
- `LINK_UNIT`: the unit of every stage whose residual branch takes the motion stream's features
  (eq. 2, "skip-stream" in Table 1); `links=` builds an appearance stream with those inputs.
- `temporal_pool=(window, stride)`: max over chunks on the conv5 map, then pool5.

Every stream, stage and unit is an ordinary module called through `__call__` (forward hooks
fire); tensors between them are clip batches (B, T, C, H, W).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from strnet.layers import (
    INTERACTIONS,
    RESIDUAL_INPUTS,
    Conv2d,
    MaxPool2d,
    MotionResidual,
    Pool5,
    SubBatchNorm2d,
    TemporalConv,
    TemporalMaxPool,
    apply_norm,
)
from strnet.weights import inflate_temporal

POOL5 = 7  # spatial window of pool5 (Table 1), applied at every location of larger maps
TEMPORAL_POOL = (5, 2)  # ST-ResNet* max-pool over chunks: window 5, stride 2 (Table 1)
STM_TEMPORAL_POOL = (5, 1)  # STM-ResNet: window 5, stride 1 (STMulNet.m, PoolTime on res5c)
TEMPORAL_UNIT = 1  # the unit of each stage that gets temporal convs (conv2_2 ... conv5_2)
LINK_UNIT = 1  # the unit of each stage whose branch takes the motion residual (eq. 2)
TEMPORAL_KINDS = ("inflate", "insert")  # ST-ResNet's 1x1 -> 1x1x3; STM's new 1x1x3 after 3x3


def conv1x1(cin: int, cout: int, stride: int = 1) -> Conv2d:
    return Conv2d(cin, cout, 1, stride=stride, bias=False)


def conv3x3(cin: int, cout: int, stride: int = 1) -> Conv2d:
    return Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def identity_temporal_(conv: TemporalConv) -> None:
    """STM-ResNet's init (`ConvTime.initParamsCtrTime`): [0 1 0] x identity in channels, bias 0."""
    with torch.no_grad():
        conv.weight.zero_()
        eye = torch.eye(conv.out_channels, conv.in_channels, dtype=conv.weight.dtype)
        conv.weight[:, :, conv.kernel // 2, 0, 0] = eye
        if conv.bias is not None:
            conv.bias.zero_()


class Downsample(nn.Sequential):
    """The projection shortcut: 1x1 conv (`downsample.0`) and BN (`downsample.1`) as torchvision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_norm(self[1], self[0](x))


class Unit(nn.Module):
    """What both residual units share: eq. 2's branch input and the pre-ReLU tap.

    `forward(x, motion=None, x_pre=None, taps=None)`: `x` is the previous unit's output; a unit
    with a `link` (an appearance unit at `LINK_UNIT`) given the motion stream's features `motion`
    feeds `link(x_a, motion)` to its residual branch, x_a being `x_pre` (the previous unit's sum
    before its ReLU) or `x` (after it) as `link.residual_input` says; the identity path keeps `x`.
    With a list `taps`, the unit appends its own pre-ReLU sum (for the next unit's eq. 2).
    """

    link: MotionResidual | None

    def branch_input(self, x, motion, x_pre):
        if motion is None:
            return x
        if self.link is None:
            raise ValueError("this residual unit has no motion link: pass no motion features")
        if self.link.residual_input == "post_relu":
            return self.link(x, motion)
        if x_pre is None:
            raise ValueError("a pre_relu motion link needs x_pre, the previous unit's pre-ReLU sum")
        return self.link(x_pre, motion)

    def finish(self, out: torch.Tensor, taps: list | None) -> torch.Tensor:
        if taps is None:
            return self.relu(out)
        taps.append(out)
        return F.relu(out)  # not in place: the tap must keep the pre-ReLU sum


class BasicBlock(Unit):
    """Two 3x3 convs (ResNet-18/34); no 1x1 convs, so no temporal variant."""

    expansion = 1

    def __init__(
        self, cin, planes, stride=1, downsample=None, *, norm, temporal=None, stride_in_1x1=False,
        link=None,
    ):  # fmt: skip
        super().__init__()
        if temporal:
            raise ValueError("temporal convs sit in bottleneck units: use ResNet-50/101/152")
        self.conv1, self.bn1 = conv3x3(cin, planes, stride), norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv3x3(planes, planes), norm(planes)
        self.downsample = downsample
        self.link = link

    def forward(self, x, motion=None, x_pre=None, taps=None):
        out = self.relu(apply_norm(self.bn1, self.conv1(self.branch_input(x, motion, x_pre))))
        out = apply_norm(self.bn2, self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.finish(out + identity, taps)


class Bottleneck(Unit):
    """1x1 -> 3x3 -> 1x1 unit, eq. 1. The stride sits on the 3x3 conv (torchvision, "v1.5") or,
    with `stride_in_1x1`, on the first 1x1 conv (the original ResNet "v1" of Table 1).

    `temporal="inflate"`: conv1 and conv3 are 1x1x3 `TemporalConv`s (Table 1, conv2_2 ...
    conv5_2); `temporal="insert"`: a new 1x1x3 C -> C conv `temporal` with a bias after the 3x3
    conv's ReLU, identity-initialised, zero-padded in time (STMulNet.m, `addConv3D = 9`).
    """

    expansion = 4

    def __init__(
        self, cin, planes, stride=1, downsample=None, *, norm, temporal=None, stride_in_1x1=False,
        link=None,
    ):  # fmt: skip
        super().__init__()
        out = planes * self.expansion
        inflate = temporal == "inflate"
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        if inflate and stride != 1:
            raise ValueError("a strided unit cannot hold temporal convs")
        self.conv1 = TemporalConv(cin, planes) if inflate else conv1x1(cin, planes, s1)
        self.bn1 = norm(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, s3), norm(planes)
        if temporal == "insert":
            self.temporal = TemporalConv(planes, planes, bias=True, padding="zeros")
        else:
            self.temporal = None
        self.conv3 = TemporalConv(planes, out) if inflate else conv1x1(planes, out)
        self.bn3 = norm(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.link = link

    def forward(self, x, motion=None, x_pre=None, taps=None):
        out = self.relu(apply_norm(self.bn1, self.conv1(self.branch_input(x, motion, x_pre))))
        out = self.relu(apply_norm(self.bn2, self.conv2(out)))
        if self.temporal is not None:
            out = self.temporal(out)
        out = apply_norm(self.bn3, self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.finish(out + identity, taps)


class Stage(nn.Sequential):
    """conv{2,3,4,5}_x: residual units in order (keys `layerN.<unit>.*` as torchvision).

    `forward(x, motion=None, taps=None)`: `motion` is the other stream's features for this stage's
    `LINK_UNIT` (its input to the same unit); with a list `taps`, the input of `LINK_UNIT` in this
    stream (the features the other stream's link needs) is appended to it.
    """

    def forward(self, x, motion=None, taps=None):
        pre: list[torch.Tensor] = []
        for i, unit in enumerate(self):
            if i == LINK_UNIT and motion is not None:
                x = unit(x, motion, x_pre=pre[-1] if pre else None)
            elif i == LINK_UNIT - 1 and motion is not None and self._wants_pre():
                x = unit(x, taps=pre)
            else:
                x = unit(x)
            if taps is not None and i == LINK_UNIT - 1:
                taps.append(x)
        return x

    def _wants_pre(self) -> bool:
        link = getattr(self[LINK_UNIT], "link", None) if len(self) > LINK_UNIT else None
        return link is not None and link.residual_input == "pre_relu"


class ResNet(nn.Module):
    """A ResNet stream. Input (B, T, C, H, W) -> scores (B, T', K); (N, C, H, W) -> (N, K).

    Keys match torchvision (`conv1`, `bn1`, `layer1.0.conv1`, ..., `fc`). Any frame size works:
    pool5 averages 7x7 windows at every location of the conv5 map and the classifier scores of
    all locations are averaged (Sec. 3.4); at 224x224 that is torchvision's global pool + fc.
    With `temporal_pool`, the conv5 map is max-pooled over chunks first (STResNet_stage2.m).

    `forward(x, motion=None, taps=None)`: `motion` is a list of the motion stream's features,
    one per stage (an appearance stream built with `links`); `taps` a list each stage appends
    its `LINK_UNIT` input to (what a motion stream hands the appearance stream).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        width: int = 64,
        bn_sub_batch: int | None = None,
        temporal: bool | str | None = None,
        temporal_pool: bool | tuple[int, int] | None = None,
        stride_in_1x1: bool = False,
        links: str | None = None,
        residual_input: str = "pre_relu",
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (
            not isinstance(head_dropout, int | float)
            or isinstance(head_dropout, bool)
            or not (0 <= head_dropout < 1)
        ):
            raise ValueError(f"head_dropout must be in [0, 1), got {head_dropout!r}")
        temporal = "inflate" if temporal is True else (temporal or None)
        if temporal is not None and temporal not in TEMPORAL_KINDS:
            raise ValueError(f"temporal must be one of {TEMPORAL_KINDS} or None, got {temporal!r}")
        if temporal and block is not Bottleneck:
            raise ValueError("ST-ResNet's temporal convs need a bottleneck ResNet (50/101/152)")
        if links is not None and links not in INTERACTIONS:
            raise ValueError(f"links must be one of {INTERACTIONS} or None, got {links!r}")
        if residual_input not in RESIDUAL_INPUTS:
            raise ValueError(
                f"residual_input must be one of {RESIDUAL_INPUTS}, got {residual_input!r}"
            )
        if temporal_pool is True:
            temporal_pool = TEMPORAL_POOL
        self.norm = partial(SubBatchNorm2d, sub_batch=bn_sub_batch or None)
        self.temporal, self.stride_in_1x1 = temporal, stride_in_1x1
        self.links, self.residual_input = links, residual_input
        self.in_channels = in_channels
        self.inplanes = width
        self.conv1 = Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = self.norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0], 1)
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2)
        self.tpool = TemporalMaxPool(*temporal_pool) if temporal_pool else None
        self.avgpool = Pool5(POOL5)
        # dropout on the pooled features before fc: none in the paper ("sub-batch normalization
        # replaces the need for dropout", Sec. 3.3); the authors' motion stream and STM-ResNet
        # code use 0.8 (cnn_ucf101_temporal.m, STMulNet.m). No parameters, no state-dict keys.
        self.drop = nn.Dropout(head_dropout) if head_dropout else None
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        self.reset_parameters()

    @property
    def temporal_pool(self) -> tuple[int, int] | None:
        return None if self.tpool is None else (self.tpool.window, self.tpool.stride)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> Stage:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = Downsample(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                self.norm(planes * block.expansion),
            )
        units = []
        for i in range(blocks):
            link = None
            if self.links is not None and i == LINK_UNIT:
                link = MotionResidual(self.links, self.residual_input)
            units.append(
                block(
                    self.inplanes,
                    planes,
                    stride if i == 0 else 1,
                    downsample if i == 0 else None,
                    norm=self.norm,
                    temporal=self.temporal if i == TEMPORAL_UNIT else None,
                    stride_in_1x1=self.stride_in_1x1,
                    link=link,
                )
            )
            self.inplanes = planes * block.expansion
        return Stage(*units)

    def reset_parameters(self) -> None:
        """torchvision's init; ST-ResNet's temporal convs start as eq. 5 inflations of a fresh
        1x1 filter, STM-ResNet's as the identity over time."""
        inserted = {id(u.temporal) for s in self.stages for u in s if getattr(u, "temporal", None)}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, TemporalConv) and id(m) in inserted:
                identity_temporal_(m)
            elif isinstance(m, TemporalConv):
                flat = torch.empty(m.out_channels, m.in_channels, 1, 1)
                nn.init.kaiming_normal_(flat, mode="fan_out", nonlinearity="relu")
                with torch.no_grad():
                    m.weight.copy_(inflate_temporal(flat, m.kernel))

    def fresh_keys(self) -> list[str]:
        """State-dict keys no 2D ResNet checkpoint holds: STM's inserted temporal convs (they keep
        their identity initialisation) and the convs concatenation fusion widened (`widened`,
        set by `strnet.fusion.widen_after`; Kaiming-initialised, as the paper's fresh layer)."""
        widened = tuple(getattr(self, "widened", ()))
        return [
            k for k in self.state_dict() if ".temporal." in k or (widened and k.startswith(widened))
        ]

    @property
    def stages(self) -> list[Stage]:
        """conv2_x ... conv5_x of Table 1."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as a clip batch (B, T, C, H, W), or ValueError (one line) naming what is
        expected."""
        want = f"clips (B, T, {self.in_channels}, H, W) or frames (N, {self.in_channels}, H, W)"
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"expected a tensor of {want}, got {type(x).__name__}")
        if x.dim() not in (4, 5) or x.shape[-3] != self.in_channels:
            raise ValueError(f"expected {want}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(
                f"expected floating-point input (normalised frames, e.g. float32), got {x.dtype}"
            )
        return x if x.dim() == 5 else x[:, None]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 + pool1: (.., C, H, W) -> (.., width, H/4, W/4)."""
        return self.maxpool(self.relu(apply_norm(self.bn1, self.conv1(x))))

    def pool5(self, x: torch.Tensor) -> torch.Tensor:
        """conv5 map (B, T, C, h, w) -> (B, T', C, h', w'): max over chunks (ST-ResNet*, STM),
        then the 7x7 average at every location."""
        if self.tpool is not None:
            x = self.tpool(x)
        return self.avgpool(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """conv5 map (B, T, C, h, w) -> scores (B, T', K), averaged over spatial locations.

        The classifier is affine, so averaging pooled features before it equals averaging its
        scores at every location (Sec. 3.4's fully convolutional testing).
        """
        x = self.pool5(x).mean(dim=(-2, -1))
        return self.fc(x if self.drop is None else self.drop(x))

    def forward(self, x: torch.Tensor, motion=None, taps: list | None = None) -> torch.Tensor:
        single = isinstance(x, torch.Tensor) and x.dim() == 4
        h = self.stem(self.check_input(x))
        if motion is not None and len(motion) != len(self.stages):
            raise ValueError(f"motion features: expected one per stage (4), got {len(motion)}")
        for i, stage in enumerate(self.stages):
            h = stage(h, None if motion is None else motion[i], taps)
        scores = self.head(h)
        return scores[:, 0] if single and scores.shape[1] == 1 else scores


DEPTHS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


def resnet(depth: int = 50, **kwargs) -> ResNet:
    """A ResNet of `depth` (18, 34, 50, 101, 152); keyword arguments go to `ResNet`."""
    if depth not in DEPTHS:
        raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
    block, layers = DEPTHS[depth]
    return ResNet(block, layers, **kwargs)
