"""ResNet-18/34/50/101 with torchvision's state_dict keys, fully convolutional over chunks.

One configurable class serves the 2D streams of the two-stream baseline and the streams of
ST-ResNet (Table 1): `temporal=True` turns the 1x1 convs of each stage's second unit into 1x1x3
temporal convs, `temporal_pool=True` adds ST-ResNet*'s max-pool over chunks after pool5.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from strnet.layers import SubBatchNorm2d, TemporalConv
from strnet.weights import inflate_temporal

POOL5 = 7  # spatial window of pool5 (Table 1), applied at every location of larger maps
TEMPORAL_POOL = (5, 2)  # ST-ResNet* max-pool over chunks: window 5, stride 2 (Table 1)
TEMPORAL_UNIT = 1  # index of the residual unit of each stage that gets temporal convs


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def apply_conv(conv: nn.Module, x: torch.Tensor, chunks: int) -> torch.Tensor:
    """Run a 2D conv, or a temporal conv that needs to know the chunk count."""
    return conv(x, chunks) if isinstance(conv, TemporalConv) else conv(x)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); no 1x1 convs, so no temporal variant."""

    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None, *, norm, temporal=False):
        super().__init__()
        if temporal:
            raise ValueError("temporal convs replace 1x1 convs: use a bottleneck ResNet (50/101)")
        self.conv1, self.bn1 = conv3x3(cin, planes, stride), norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv3x3(planes, planes), norm(planes)
        self.downsample = downsample

    def forward(self, x, chunks: int = 1, branch_input: torch.Tensor | None = None):
        h = x if branch_input is None else branch_input
        out = self.relu(self.bn1(self.conv1(h)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 unit (torchvision v1.5: stride on the 3x3), eq. 1.

    With `temporal`, conv1 and conv3 are 1x1x3 `TemporalConv`s (Table 1, conv2_2 ... conv5_2).
    `branch_input` (eq. 2) replaces the residual branch's input; the identity path keeps `x`.
    """

    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None, *, norm, temporal=False):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = TemporalConv(cin, planes) if temporal else conv1x1(cin, planes)
        self.bn1 = norm(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride), norm(planes)
        self.conv3 = TemporalConv(planes, out) if temporal else conv1x1(planes, out)
        self.bn3 = norm(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x, chunks: int = 1, branch_input: torch.Tensor | None = None):
        h = x if branch_input is None else branch_input
        out = self.relu(self.bn1(apply_conv(self.conv1, h, chunks)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(apply_conv(self.conv3, out, chunks))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A ResNet stream. Input (B, T, C, H, W) -> scores (B, T', K); (N, C, H, W) -> (N, K).

    Keys match torchvision (`conv1`, `bn1`, `layer1.0.conv1`, ..., `fc`). Any frame size works:
    pool5 averages 7x7 windows at every location of the conv5 map and the classifier scores of
    all locations are averaged (Sec. 3.4); at 224x224 that is torchvision's global pool + fc.
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
        temporal: bool = False,
        temporal_pool: bool = False,
    ) -> None:
        super().__init__()
        if temporal and block is not Bottleneck:
            raise ValueError("ST-ResNet's temporal convs need a bottleneck ResNet (50/101)")
        self.norm = partial(SubBatchNorm2d, sub_batch=bn_sub_batch or None)
        self.temporal, self.temporal_pool = temporal, temporal_pool
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = self.norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0], 1)
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2)
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        self.reset_parameters()

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                self.norm(planes * block.expansion),
            )
        units = []
        for i in range(blocks):
            temporal = self.temporal and i == TEMPORAL_UNIT
            units.append(
                block(
                    self.inplanes,
                    planes,
                    stride if i == 0 else 1,
                    downsample if i == 0 else None,
                    norm=self.norm,
                    temporal=temporal,
                )
            )
            self.inplanes = planes * block.expansion
        return nn.Sequential(*units)

    def reset_parameters(self) -> None:
        """torchvision's init; temporal convs start as eq. 5 inflations of a fresh 1x1 filter."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, TemporalConv):
                flat = torch.empty(m.out_channels, m.in_channels, 1, 1)
                nn.init.kaiming_normal_(flat, mode="fan_out", nonlinearity="relu")
                with torch.no_grad():
                    m.weight.copy_(inflate_temporal(flat, m.kernel))

    @property
    def stages(self) -> list[nn.Sequential]:
        """conv2_x ... conv5_x of Table 1."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def set_chunks(self, chunks: int) -> None:
        """Tell sub-batch BN layers how many rows of the batch form one clip."""
        for m in self.modules():
            if isinstance(m, SubBatchNorm2d):
                m.chunks = chunks

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 + pool1: (N, C, H, W) -> (N, width, H/4, W/4)."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def pool5(self, x: torch.Tensor, batch: int, chunks: int) -> torch.Tensor:
        """(B*T, C, h, w) -> (B, T', C, h', w'): 7x7 average at every location, then (ST-ResNet*)
        max over windows of 5 chunks with stride 2; fewer than 5 chunks pool over all of them."""
        x = F.avg_pool2d(x, (min(POOL5, x.shape[-2]), min(POOL5, x.shape[-1])), stride=1)
        x = x.view(batch, chunks, *x.shape[1:])
        if self.temporal_pool:
            window, stride = TEMPORAL_POOL
            window = min(window, chunks)
            b, t, c, h, w = x.shape
            cols = x.permute(0, 2, 3, 4, 1).reshape(b, c * h * w, t)
            pooled = F.max_pool1d(cols, window, stride)
            x = pooled.view(b, c, h, w, -1).permute(0, 4, 1, 2, 3)
        return x

    def head(self, x: torch.Tensor, batch: int, chunks: int) -> torch.Tensor:
        """conv5 map (B*T, C, h, w) -> scores (B, T', K), averaged over spatial locations.

        The classifier is affine, so averaging pooled features before it equals averaging its
        scores at every location (Sec. 3.4's fully convolutional testing).
        """
        return self.fc(self.pool5(x, batch, chunks).mean(dim=(-2, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = x.dim() == 4
        clip = x[:, None] if single else x
        b, t = clip.shape[:2]
        self.set_chunks(t)
        h = self.stem(clip.flatten(0, 1))
        for stage in self.stages:
            for unit in stage:
                h = unit(h, t)
        scores = self.head(h, b, t)
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
