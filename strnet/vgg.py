"""VGG-M-2048 and VGG-16 towers of Two-Stream Fusion (Feichtenhofer, Pinz, Zisserman, CVPR 2016).

Sec. 3.5: "the VGG-M-2048 model [3] with 5 convolutional and 3 fully-connected layers" and "the
very deep VGG-16 model [23] that has 13 convolutional and 3 fully-connected layers", no batch
normalisation, dropout on fc6 and fc7 (0.85 for fusion training, `cnn_ucf101_fusion.m`).

Layers carry the MatConvNet names of the authors' models (`conv1`, `relu1`, `norm1`, `pool1`,
..., `relu5`, `pool5`, `fc6`, `relu6`, `drop6`, `fc7`, `relu7`, `drop7`, `fc8`; VGG-16:
`conv1_1` ... `relu5_3`), so a fusion point is named as in the paper (`relu5`, `relu5_3`) and
state-dict keys are `conv1.weight`, `fc6.weight`, ... The fully-connected layers are
convolutions (fc6 a 6x6 (VGG-M) or 7x7 (VGG-16) conv over pool5, fc7/fc8 1x1), as MatConvNet
stores them: any frame size works and the class scores of all locations are averaged (the
paper's fully convolutional testing, Sec. 3.5). Tensors between layers are clip batches
(B, T, C, H, W), as in `strnet.resnet`.

VGG-M-2048 (Chatfield et al. 2014): conv1 96 7x7 /2, LRN, max 3x3 /2; conv2 256 5x5 /2 pad 1,
LRN, max 3x3 /2 (rounded up: 26 -> 13, MatConvNet pads it by one); conv3-5 512 3x3; max 3x3 /2;
fc6 4096, fc7 2048. At 224^2 relu5 is 13 x 13 (VGG-16's relu5_3: 14 x 14, Sec. 3.5).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from strnet.layers import Conv2d, TemporalMaxPool, per_chunk

BACKBONES = ("vggm2048", "vgg16")
DROPOUT = 0.85  # fc6/fc7 dropout of fusion training (Sec. 3.5; cnn_ucf101_fusion.m)
LRN = dict(size=5, alpha=5e-4, beta=0.75, k=2.0)  # VGG-M norm1/norm2 (MatConvNet [5 2 1e-4 .75])

# (name, out channels, kernel, stride, padding) of each conv; ("pool", kernel, stride, ceil)
VGGM_2048 = (
    ("conv1", 96, 7, 2, 0), "relu1", "norm1", ("pool1", 3, 2, False),
    ("conv2", 256, 5, 2, 1), "relu2", "norm2", ("pool2", 3, 2, True),
    ("conv3", 512, 3, 1, 1), "relu3", ("conv4", 512, 3, 1, 1), "relu4",
    ("conv5", 512, 3, 1, 1), "relu5", ("pool5", 3, 2, False),
)  # fmt: skip
VGGM_FC = (4096, 2048)  # fc6, fc7 widths; fc6's kernel is pool5's map at 224^2: 6 x 6
VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))  # (channels, convs) per block
VGG16_FC = (4096, 4096)


def vgg16_layers() -> tuple:
    layers: list = []
    for b, (channels, convs) in enumerate(VGG16_BLOCKS, 1):
        for c in range(1, convs + 1):
            layers += [(f"conv{b}_{c}", channels, 3, 1, 1), f"relu{b}_{c}"]
        layers.append((f"pool{b}", 2, 2, False))
    return tuple(layers)


SPECS = {  # backbone -> (feature layers, (fc6, fc7) widths, fc6 kernel, name of "relu5")
    "vggm2048": (VGGM_2048, VGGM_FC, 6, "relu5"),
    "vgg16": (vgg16_layers(), VGG16_FC, 7, "relu5_3"),
}


class MaxPool(nn.Module):
    """Max pooling of every chunk; a window larger than the map shrinks to it (tiny inputs)."""

    def __init__(self, kernel: int, stride: int, ceil_mode: bool = False) -> None:
        super().__init__()
        self.kernel, self.stride, self.ceil_mode = kernel, stride, ceil_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = (min(self.kernel, x.shape[-2]), min(self.kernel, x.shape[-1]))
        return per_chunk(lambda f: F.max_pool2d(f, k, self.stride, 0, 1, self.ceil_mode), x)

    def extra_repr(self) -> str:
        ceil = ", ceil" if self.ceil_mode else ""
        return f"{self.kernel}x{self.kernel}, stride {self.stride}{ceil}"


class LocalResponseNorm(nn.LocalResponseNorm):
    """`nn.LocalResponseNorm` across the channels of every chunk."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_chunk(super().forward, x)


class FullyConnected(Conv2d):
    """An fc layer as a convolution over the map (fc6: pool5's window; fc7, fc8: 1x1).

    A map smaller than the window (frames well under 224^2) is first resized to it by adaptive
    average pooling, as torchvision's VGG does before its classifier.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        if x.shape[-2] < kh or x.shape[-1] < kw:
            size = (max(x.shape[-2], kh), max(x.shape[-1], kw))
            x = per_chunk(lambda f: F.adaptive_avg_pool2d(f, size), x)
        return super().forward(x)


def init_layer(m: nn.Module) -> None:
    """torchvision's VGG init: convs Kaiming (fan out), fc layers N(0, 0.01), biases 0."""
    if isinstance(m, FullyConnected):
        nn.init.normal_(m.weight, 0, 0.01)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(m.bias)


class VGG(nn.Module):
    """A VGG tower: clips (B, T, C, H, W) -> scores (B, T, K); frames (N, C, H, W) -> (N, K).

    Layers are children in order (`names`); `run(x, start, stop)` runs the layers after `start`
    up to and including `stop` (None: from the input / to the scores, averaged over locations),
    which is how `strnet.fusion` cuts two towers at a fusion point. `tpool` (None unless set)
    max-pools over chunks right before pool5, making it the 3D pooling of Sec. 3.3.

    `width` scales every layer by width / 64 (64: the paper's network; tests use 8 or less).
    ReLUs are not in place: the map at a fusion point feeds the fusion and its own tower.
    """

    def __init__(
        self,
        backbone: str = "vggm2048",
        *,
        num_classes: int = 101,
        in_channels: int = 3,
        width: int = 64,
        dropout: float = DROPOUT,
    ) -> None:
        super().__init__()
        if backbone not in SPECS:
            raise ValueError(f"unknown VGG backbone {backbone!r}; known: {', '.join(BACKBONES)}")
        number = isinstance(dropout, int | float) and not isinstance(dropout, bool)
        if not number or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        features, fc, fc6_kernel, self.relu5_name = SPECS[backbone]
        self.backbone, self.in_channels = backbone, in_channels
        scale = lambda c: max(1, round(c * width / 64))  # noqa: E731
        self.names: list[str] = []
        cin = in_channels
        self.channels: dict[str, int] = {}  # output channels after each layer
        for spec in features:
            if isinstance(spec, str):
                layer = nn.ReLU() if spec.startswith("relu") else LocalResponseNorm(**LRN)
                self._add(spec, layer, cin)
            elif spec[0].startswith("pool"):
                self._add(spec[0], MaxPool(*spec[1:]), cin)
            else:
                name, cout, k, s, p = spec
                self._add(name, Conv2d(cin, scale(cout), k, stride=s, padding=p), scale(cout))
                cin = scale(cout)
        for i, (cout, k) in enumerate(((scale(fc[0]), fc6_kernel), (scale(fc[1]), 1)), 6):
            self._add(f"fc{i}", FullyConnected(cin, cout, k), cout)
            self._add(f"relu{i}", nn.ReLU(), cout)
            self._add(f"drop{i}", nn.Dropout(dropout), cout)
            cin = cout
        self._add("fc8", FullyConnected(cin, num_classes, 1), num_classes)
        self.tpool: TemporalMaxPool | None = None
        self.dropped_layers: tuple[str, ...] = ()  # deleted by `truncate_after`
        self.widened: list[str] = []  # re-made by `widen_after`
        self.reset_parameters()

    def _add(self, name: str, layer: nn.Module, channels: int) -> None:
        self.add_module(name, layer)
        self.names.append(name)
        self.channels[name] = channels

    def reset_parameters(self) -> None:
        """torchvision's VGG init: convs Kaiming (fan out), fc layers N(0, 0.01), biases 0."""
        for name in self.names:
            init_layer(getattr(self, name))

    def layer_index(self, name: str) -> int:
        """Position of layer `name` (`relu5` also names VGG-16's relu5_3); one-line ValueError."""
        if name == "relu5":
            name = self.relu5_name
        if name not in self.names:
            raise ValueError(
                f"unknown layer {name!r} of {self.backbone}; known: relu5, {', '.join(self.names)}"
            )
        return self.names.index(name)

    def layers(self, start: str | None = None, stop: str | None = None) -> Iterable[str]:
        lo = 0 if start is None else self.layer_index(start) + 1
        hi = len(self.names) if stop is None else self.layer_index(stop) + 1
        return self.names[lo:hi]

    def channels_at(self, name: str) -> int:
        """Channels of the map after layer `name`."""
        return self.channels[self.names[self.layer_index(name)]]

    def truncate_after(self, name: str) -> None:
        """Delete the layers after `name` (a tower truncated after fusion, Fig. 2 left)."""
        later = tuple(self.layers(start=name))
        for layer in later:
            delattr(self, layer)
        self.names = self.names[: self.layer_index(name) + 1]
        self.dropped_layers += later

    def widen_after(self, name: str, channels: int) -> None:
        """Give the first conv/fc layer after `name` `channels` inputs (a fresh layer): what
        concatenation fusion does to the layer it feeds (Table 1: fc6 doubles)."""
        for later in self.layers(start=name):
            old = getattr(self, later)
            if isinstance(old, nn.Conv2d):
                kind = FullyConnected if isinstance(old, FullyConnected) else Conv2d
                new = kind(channels, old.out_channels, old.kernel_size, stride=old.stride,
                           padding=old.padding)  # fmt: skip
                init_layer(new)
                setattr(self, later, new.to(old.weight.device))
                self.widened.append(later)
                return
        raise ValueError(f"no conv or fc layer of {self.backbone} after {name!r} to widen")

    def fresh_keys(self) -> list[str]:
        """Keys a single-stream checkpoint cannot fill (layers widened by concatenation)."""
        return [k for k in self.state_dict() if k.split(".")[0] in self.widened]

    def summary_modules(self) -> dict[str, nn.Module]:
        """Rows of `strnet summary`: every conv, pool and fc layer."""
        return {n: getattr(self, n) for n in self.names if n.startswith(("conv", "pool", "fc"))}

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as clips (B, T, C, H, W), or a one-line ValueError naming what is expected."""
        want = f"clips (B, T, {self.in_channels}, H, W) or frames (N, {self.in_channels}, H, W)"
        if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected {want}, got {got}")
        if x.shape[-3] != self.in_channels:
            raise ValueError(f"expected {want}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected floating-point input (normalised frames), got {x.dtype}")
        return x if x.dim() == 5 else x[:, None]

    def run(self, x: torch.Tensor, start: str | None = None, stop: str | None = None):
        """Layers after `start` through `stop`; with `stop` None, the location-averaged scores."""
        for name in self.layers(start, stop):
            if name == "pool5" and self.tpool is not None:
                x = self.tpool(x)
            x = getattr(self, name)(x)
        return x.mean(dim=(-2, -1)) if stop is None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = x.dim() == 4 if isinstance(x, torch.Tensor) else False
        scores = self.run(self.check_input(x))
        return scores[:, 0] if single and scores.shape[1] == 1 else scores


def vgg(backbone: str = "vggm2048", **kwargs) -> VGG:
    """A VGG-M-2048 (`vggm2048`) or VGG-16 (`vgg16`) tower; keyword arguments go to `VGG`."""
    return VGG(backbone, **kwargs)
