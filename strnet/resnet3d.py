"""3D ResNets of Hara, Kataoka and Satoh (2017), Table 1: 3x3x3 basic blocks, type-A shortcuts.

Input clips are (B, C, T, H, W), channels first as in the paper ("3 x 16 x 112 x 112"), and the
output is class scores (B, K) before softmax. Layers and state-dict keys follow torchvision's 2D
ResNet (`conv1`, `bn1`, `layer3.1.conv2.weight`, `fc.bias`) with one more (time) axis in each
conv filter, so a 2D ImageNet file inflates key by key: `strnet.weights.load_pretrained` (or
`model.init=resnet18.pth` in a config) divides each 2D filter by the kernel depth and repeats it
over time (I3D, `inflate_kernel`) and skips the 2D file's projection shortcuts.

- conv1: 7x7x7, 64 channels, stride 1 in time and 2 in space (Sec. 3.1, "similar to C3D").
- conv2_x: 3x3x3 max pool, stride 2 in all three axes (Table 1), then the basic blocks.
- conv3_1, conv4_1, conv5_1 downsample with stride 2 in all three axes.
- Shortcuts where the channels grow are type A of He et al. (identity, subsampled with the
  block's stride, zero-padded channels): no parameters (`ShortcutA`).
- Average pool over what is left (1 x 4 x 4 for 16 x 112 x 112), then the fc layer.

A clip with fewer than `clip_frames` (16) frames is looped in time to 16 frames before conv1,
as the paper loops short videos (Sec. 3.2.1): frames 0, 1, ..., T-1, 0, 1, ... A longer clip is
taken as it is (the average pool adapts to any size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CLIP_FRAMES = 16  # frames per clip (Sec. 3.1: inputs are 3 x 16 x 112 x 112)
CLIP_SIZE = 112  # spatial side of a clip (Sec. 3.1)
DEPTHS3D = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}  # basic blocks per stage, Table 1


def loop_frames(num_frames: int, length: int) -> list[int]:
    """Indices 0..num_frames-1 repeated from the start until there are `length` of them.

    The paper's rule for videos shorter than a clip ("we loop the videos as many times as
    necessary"); a sequence already that long is cut to `length`.
    """
    if num_frames < 1:
        raise ValueError(f"cannot loop a clip of {num_frames} frames")
    return [i % num_frames for i in range(length)]


def conv3x3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class ShortcutA(nn.Module):
    """Type-A shortcut: identity subsampled by `stride`, channels zero-padded to `planes`.

    Hara's code does the subsampling as a 1x1x1 average pool with the stride; taking every
    `stride`-th element is the same and matches the conv's output size (ceil(n / stride)).
    """

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.extra, self.stride = planes - inplanes, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        out = x[:, :, ::s, ::s, ::s] if s > 1 else x
        return F.pad(out, (0, 0, 0, 0, 0, 0, 0, self.extra)) if self.extra else out


class BasicBlock3d(nn.Module):
    """[3x3x3, planes; 3x3x3, planes] with BN and ReLU (Table 1, Fig. 1)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3x3(planes, planes)
        self.bn2 = nn.BatchNorm3d(planes)
        needs = stride != 1 or inplanes != planes
        self.downsample = ShortcutA(inplanes, planes, stride) if needs else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet3d(nn.Module):
    """3D ResNet of Table 1 (Hara et al. 2017): clips (B, C, T, H, W) -> scores (B, K).

    `layers` are the blocks per stage ((2, 2, 2, 2) for 18 layers, (3, 4, 6, 3) for 34),
    `width` conv1's channels (64 in the paper; doubled per stage), `in_channels` 3 for RGB.
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        *,
        num_classes: int = 400,
        width: int = 64,
        in_channels: int = 3,
        clip_frames: int = CLIP_FRAMES,
    ) -> None:
        super().__init__()
        self.in_channels, self.clip_frames = in_channels, clip_frames
        self.conv1 = nn.Conv3d(
            in_channels, width, kernel_size=7, stride=(1, 2, 2), padding=3, bias=False
        )
        self.bn1 = nn.BatchNorm3d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        self.inplanes = width
        self.layer1 = self._make_layer(width, layers[0], 1)
        self.layer2 = self._make_layer(2 * width, layers[1], 2)
        self.layer3 = self._make_layer(4 * width, layers[2], 2)
        self.layer4 = self._make_layer(8 * width, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(8 * width, num_classes)
        self.reset_parameters()

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        units = [BasicBlock3d(self.inplanes, planes, stride)]
        self.inplanes = planes
        units += [BasicBlock3d(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*units)

    def reset_parameters(self) -> None:
        """He init (fan out) for convs, BN scale 1 and shift 0, as Hara's and torchvision's code."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def dropped_layers(self) -> tuple[str, ...]:
        """The projection shortcuts of a 2D ResNet file, which type-A shortcuts do without:
        `strnet.weights.load_pretrained` skips their keys when it inflates 2D weights."""
        return tuple(f"layer{i}.0.downsample" for i in (2, 3, 4))

    @property
    def stages(self) -> list[nn.Sequential]:
        """conv2_x ... conv5_x of Table 1."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """The clip batch, looped in time to `clip_frames` when shorter; ValueError (one line)
        naming the expected shape and dtype otherwise."""
        want = f"clips (B, {self.in_channels}, T, H, W)"
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"expected a tensor of {want}, got {type(x).__name__}")
        if x.dim() != 5 or x.shape[1] != self.in_channels or min(x.shape[2:]) < 1:
            raise ValueError(f"expected {want}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(
                f"expected floating-point input (mean-subtracted clips), got {x.dtype}"
            )
        if x.shape[2] < self.clip_frames:
            x = x[:, :, loop_frames(x.shape[2], self.clip_frames)]
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.maxpool(self.relu(self.bn1(self.conv1(self.check_input(x)))))
        for stage in self.stages:
            h = stage(h)
        return self.fc(torch.flatten(self.avgpool(h), 1))


def resnet3d(depth: int = 18, **kwargs) -> ResNet3d:
    """A 3D ResNet of Table 1 with `depth` 18 or 34; keyword arguments go to `ResNet3d`."""
    if depth not in DEPTHS3D:
        raise ValueError(f"3D ResNet depth must be one of {sorted(DEPTHS3D)}, got {depth}")
    return ResNet3d(DEPTHS3D[depth], **kwargs)
