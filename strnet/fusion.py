"""Two-Stream Fusion networks (Feichtenhofer, Pinz, Zisserman, CVPR 2016), Sec. 3.1-3.5.

Two towers (VGG-M-2048, VGG-16 or ResNet-50; appearance on RGB, motion on 2L flow channels)
are fused after a named layer (`fuse_at`) by one of the fusion functions of Sec. 3.1 (sum, max,
concatenation, 1x1 conv, bilinear) or by the 3D conv of Sec. 3.3 (3x3x3 over space and chunks,
followed by 3D pooling). The fused map goes on through the rest of the appearance tower (the
authors fuse the temporal net *into* the spatial one, `cnn_ucf101_fusion.m`); the motion tower is
truncated after the fusion point (Fig. 2 left, Table 1) or kept with its own classifier and loss
(Fig. 2 right, Sec. 3.4). `fuse_at="softmax"` is late fusion: both towers whole, their scores
averaged (the two-stream baseline of Table 1's first rows). Several points joined by "+" fuse at
each (Table 2, Fig. 2 right): `relu5+fc8` fuses the motion map into the appearance tower at
relu5, keeps the motion tower whole and averages the two towers' fc8 scores into one output.

`FusionNet.forward(rgb, flow)` takes (B, T, 3, H, W) and (B, T, 2L, H, W) and returns scores
before softmax, (B, T', K) per output: {"fusion"} (truncated), {"fusion", "motion"} (both towers
kept) or {"appearance", "motion"} (softmax). The trainer puts one loss on each and evaluation
averages them (`strnet.st_resnet.fuse`), as Sec. 3.4 trains and tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strnet.layers import TemporalMaxPool, per_chunk
from strnet.resnet import resnet
from strnet.st_resnet import check_clip_pair
from strnet.vgg import VGG, vgg

FUSIONS = ("sum", "max", "concat", "conv", "bilinear", "conv3d")
SAME_CHANNELS = ("sum", "max", "conv", "conv3d")  # fusions that pair channel d with channel d
POOL3D = (5, 2)  # 3D pooling over chunks: window T = 5, stride 2 (cnn_ucf101_fusion.m)
CONV3D_INIT = (0.25, 0.75)  # appearance / motion identity weights: motion x3 (Sec. 3.5)
GAUSSIAN_SIGMA = 1.0  # sigma of the 3x3x3 Gaussian over the conv3d support (Sec. 3.5)
RESNET_POINTS = ("pool1", "layer1", "layer2", "layer3", "layer4")
SCORES = "fc8"  # the last point of a "+" list that fuses the towers' class scores (Table 2)
MULTI_FUSIONS = ("sum", "max", "conv")  # fusions that keep the map's shape at every point
RESNET_ALIASES = {"relu5": "layer4", "conv2_x": "layer1", "conv3_x": "layer2",
                  "conv4_x": "layer3", "conv5_x": "layer4"}  # fmt: skip


# --------------------------------------------------------------------------- fusion functions
def match_sizes(xa: torch.Tensor, xm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps (..., C, H, W) of equal H, W; one smaller by one row/column is zero-padded at the
    bottom/right (Sec. 3.5: VGG-M's 13 x 13 relu5 against VGG-16's 14 x 14). Sizes further
    apart are a one-line ValueError."""
    (ha, wa), (hm, wm) = xa.shape[-2:], xm.shape[-2:]
    if (ha, wa) == (hm, wm):
        return xa, xm
    if abs(ha - hm) > 1 or abs(wa - wm) > 1:
        raise ValueError(
            f"cannot fuse maps of {ha} x {wa} (appearance) and {hm} x {wm} (motion): sizes may "
            "differ by one row/column at most"
        )
    h, w = max(ha, hm), max(wa, wm)

    def pad(x: torch.Tensor) -> torch.Tensor:
        dh, dw = h - x.shape[-2], w - x.shape[-1]
        return F.pad(x, (0, dw, 0, dh)) if dh or dw else x

    return pad(xa), pad(xm)


class Fusion(nn.Module):
    """f(x_a, x_m) of Sec. 3.1 on maps (B, T, C, H, W) (or (N, C, H, W)), sizes matched first."""

    kind = ""

    def __init__(self, channels_a: int, channels_m: int) -> None:
        super().__init__()
        if self.kind in SAME_CHANNELS and channels_a != channels_m:
            raise ValueError(
                f"{self.kind} fusion pairs channels one to one: appearance has {channels_a}, "
                f"motion {channels_m}"
            )
        self.channels_a, self.channels_m = channels_a, channels_m

    @property
    def out_channels(self) -> int:
        return self.channels_a

    def forward(self, xa: torch.Tensor, xm: torch.Tensor) -> torch.Tensor:
        channels = (xa.shape[-3], xm.shape[-3]) == (self.channels_a, self.channels_m)
        if xa.dim() != xm.dim() or xa.shape[:-3] != xm.shape[:-3] or not channels:
            raise ValueError(
                f"{self.kind} fusion: appearance {tuple(xa.shape)} and motion {tuple(xm.shape)} "
                f"maps need the same clips and {self.channels_a} + {self.channels_m} channels"
            )
        return self.fuse(*match_sizes(xa, xm))

    def fuse(self, xa: torch.Tensor, xm: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.channels_a} + {self.channels_m} -> {self.out_channels}"


class SumFusion(Fusion):
    """Eq. 1: y = x_a + x_m at every location and channel."""

    kind = "sum"

    def fuse(self, xa, xm):
        return xa + xm


class MaxFusion(Fusion):
    """Eq. 2: y = max(x_a, x_m) at every location and channel."""

    kind = "max"

    def fuse(self, xa, xm):
        return torch.maximum(xa, xm)


class ConcatFusion(Fusion):
    """Eq. 3: the channels of x_a, then those of x_m (2D channels; the paper interleaves them,
    the authors' `dagnn.Concat` stacks them in blocks, as here)."""

    kind = "concat"

    @property
    def out_channels(self) -> int:
        return self.channels_a + self.channels_m

    def fuse(self, xa, xm):
        return torch.cat([xa, xm], dim=-3)


def two_identities(weight: torch.Tensor, scales: tuple[float, float]) -> None:
    """Fill a (D, 2D, ...) filter bank with scales[0] * I on the appearance channels and
    scales[1] * I on the motion channels, at the kernel's every tap (`insert_conv_layers.m`)."""
    d = weight.shape[0]
    with torch.no_grad():
        weight.zero_()
        eye = torch.eye(d, dtype=weight.dtype, device=weight.device)
        eye = eye.view(d, d, *([1] * (weight.dim() - 2)))
        weight[:, :d] = scales[0] * eye
        weight[:, d:] = scales[1] * eye


class ConvFusion(Fusion):
    """Eq. 4: the stacked maps (2D channels) convolved by a 1x1 filter bank to D, with biases;
    initialised as two identity matrices, so it starts as sum fusion (Sec. 4.2, `sumAB`)."""

    kind = "conv"

    def __init__(self, channels_a: int, channels_m: int) -> None:
        super().__init__(channels_a, channels_m)
        self.conv = nn.Conv2d(channels_a + channels_m, channels_a, 1)
        two_identities(self.conv.weight, (1.0, 1.0))
        nn.init.zeros_(self.conv.bias)

    def fuse(self, xa, xm):
        return per_chunk(self.conv, torch.cat([xa, xm], dim=-3))


class BilinearFusion(Fusion):
    """Eq. 5: sum over locations of the outer products x_a x_m^T -> D_a * D_m features, then
    signed square root and L2 normalisation (Sec. 3.1, [15]). (B, T, C, H, W) -> (B, T, D^2)."""

    kind = "bilinear"
    eps = 1e-12

    @property
    def out_channels(self) -> int:
        return self.channels_a * self.channels_m

    def fuse(self, xa, xm):
        y = torch.einsum("...chw,...dhw->...cd", xa, xm).flatten(-2)
        y = torch.sign(y) * torch.sqrt(y.abs() + self.eps)
        return F.normalize(y, dim=-1)


def gaussian3(sigma: float = GAUSSIAN_SIGMA) -> torch.Tensor:
    """The 3x3x3 Gaussian of Sec. 3.5 (sigma 1), normalised to sum 1 (`cnn_ucf101_fusion.m`)."""
    r = torch.arange(-1.0, 2.0)
    g = torch.exp(-(r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2)
                  / (2 * sigma**2))  # fmt: skip
    return g / g.sum()


class Conv3dFusion(Fusion):
    """Sec. 3.3 / 3.5: stacked maps (B, T, 2D, H, W) convolved by a 3x3x3 (time x space) filter
    bank to D channels, zero-padded in time and space, with biases.

    Initialised as two identity matrices, the motion one 3x higher (0.25 appearance, 0.75 motion:
    relu5 of the temporal net is about 3x weaker), times a 3x3x3 Gaussian of sigma 1 normalised
    to sum 1: on a map constant over space and time it starts as 0.25 x_a + 0.75 x_m.
    """

    kind = "conv3d"

    def __init__(self, channels_a: int, channels_m: int) -> None:
        super().__init__(channels_a, channels_m)
        self.conv = nn.Conv3d(channels_a + channels_m, channels_a, 3, padding=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        two_identities(self.conv.weight, CONV3D_INIT)
        with torch.no_grad():
            g = gaussian3().to(self.conv.weight.device, self.conv.weight.dtype)
            self.conv.weight.mul_(g)
            self.conv.bias.zero_()

    def forward(self, xa, xm):
        if xa.dim() != 5:
            raise ValueError(f"conv3d fusion takes clips (B, T, C, H, W), got {tuple(xa.shape)}")
        return super().forward(xa, xm)

    def fuse(self, xa, xm):
        y = torch.cat([xa, xm], dim=2).transpose(1, 2)  # (B, 2D, T, H, W)
        return self.conv(y).transpose(1, 2)


FUSION_CLASSES = {c.kind: c for c in (SumFusion, MaxFusion, ConcatFusion, ConvFusion,
                                      BilinearFusion, Conv3dFusion)}  # fmt: skip


def make_fusion(kind: str, channels_a: int, channels_m: int) -> Fusion:
    """The fusion function `kind` for maps of `channels_a` and `channels_m` channels."""
    if kind not in FUSION_CLASSES:
        raise ValueError(f"unknown fusion {kind!r}; known: {', '.join(FUSIONS)}")
    return FUSION_CLASSES[kind](channels_a, channels_m)


# --------------------------------------------------------------------------- cutting towers
def point(tower: nn.Module, name: str) -> str:
    """The tower's own name of fusion point `name` (`relu5` is VGG-16's relu5_3, ResNet's
    conv5_x); a one-line ValueError for a name the tower lacks."""
    if isinstance(tower, VGG):
        return tower.names[tower.layer_index(name)]
    name = RESNET_ALIASES.get(name, name)
    if name not in RESNET_POINTS:
        known = ", ".join([*RESNET_POINTS, *RESNET_ALIASES])
        raise ValueError(f"unknown layer {name!r} of ResNet; known: {known}")
    return name


def run(tower: nn.Module, x: torch.Tensor, start: str | None, stop: str | None) -> torch.Tensor:
    """Run a tower from after `start` (None: the input) through `stop` (None: its scores)."""
    if isinstance(tower, VGG):
        return tower.run(x, start, stop)
    lo = 0 if start is None else RESNET_POINTS.index(start) + 1
    hi = len(RESNET_POINTS) if stop is None else RESNET_POINTS.index(stop) + 1
    for name in RESNET_POINTS[lo:hi]:
        x = tower.stem(x) if name == "pool1" else getattr(tower, name)(x)
    return tower.head(x) if stop is None else x


def position(tower: nn.Module, name: str) -> int:
    """Where fusion point `name` (the tower's own name) lies in the tower."""
    return tower.layer_index(name) if isinstance(tower, VGG) else RESNET_POINTS.index(name)


def channels_at(tower: nn.Module, name: str) -> int:
    if isinstance(tower, VGG):
        return tower.channels_at(name)
    if name == "pool1":
        return tower.bn1.num_features
    last = getattr(tower, name)[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


def truncate_after(tower: nn.Module, name: str) -> None:
    """Delete the tower's layers after fusion point `name` (their keys leave the state dict)."""
    if isinstance(tower, VGG):
        tower.truncate_after(name)
        return
    later = (*RESNET_POINTS[RESNET_POINTS.index(name) + 1 :], "fc")
    for layer in later:
        setattr(tower, layer, None)
    tower.dropped_layers = later  # `load_pretrained` skips their keys


def widen_after(tower: nn.Module, name: str, channels: int) -> None:
    """The layers that read the tower's map after `name` take `channels` inputs (concat)."""
    if isinstance(tower, VGG):
        tower.widen_after(name, channels)
        return
    if name == RESNET_POINTS[-1]:
        tower.fc = nn.Linear(channels, tower.fc.out_features)
        tower.widened = ["fc."]
        return
    stage = RESNET_POINTS[RESNET_POINTS.index(name) + 1]
    unit = getattr(tower, stage)[0]
    convs = [("conv1", unit)] + ([("0", unit.downsample)] if unit.downsample is not None else [])
    tower.widened = [f"{stage}.0.conv1."] + ([f"{stage}.0.downsample.0."] if len(convs) > 1 else [])
    for attr, owner in convs:
        old = getattr(owner, attr)
        new = type(old)(channels, old.out_channels, old.kernel_size, stride=old.stride,
                        padding=old.padding, bias=False)  # fmt: skip
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
        setattr(owner, attr, new)


def below(tower: nn.Module, name: str) -> nn.ModuleList:
    """The tower's layers up to and including fusion point `name`."""
    if isinstance(tower, VGG):
        return nn.ModuleList([getattr(tower, n) for n in tower.layers(None, name)])
    stages = RESNET_POINTS[1 : RESNET_POINTS.index(name) + 1]
    return nn.ModuleList([tower.conv1, tower.bn1, *(getattr(tower, n) for n in stages)])


def set_pool3d(tower: nn.Module) -> None:
    """3D pooling (Sec. 3.3): pool5 of the tower max-pools over chunks too (window 5, stride 2).
    Max over a box is max over time then space, so a max over chunks before pool5 makes pool5 a
    3D max pool (VGG: 3x3 or 2x2 in space; ResNet: time max, then its 7x7 average)."""
    tower.tpool = TemporalMaxPool(*POOL3D)


# --------------------------------------------------------------------------- the network
class FusionNet(nn.Module):
    """Two towers fused after layer `fuse_at` by `fusion` (see the module docstring).

    `truncate`: drop the motion tower after the fusion point (Fig. 2 left), else keep it with
    its own classifier (Fig. 2 right, Sec. 3.4). `pool3d` (default: with conv3d fusion) makes
    pool5 of the fused tower and of a kept motion tower 3D max pools (Sec. 3.3).
    `freeze_towers`: the towers' layers up to the (first) fusion point are not trained
    (`requires_grad=False`): "We only propagate back to the injected fusion layer" (Sec. 3.5;
    `backpropDepth` in cnn_ucf101_fusion.m); a ResNet's BatchNorm layers there keep their
    statistics too (`train`).

    `fuse_at` may list several points joined by "+" (`relu3+relu5`, `relu5+fc8`; Table 2):
    each gets its own fusion layer of the same kind, the motion tower runs on unfused and feeds
    every point, and a last point `fc8` averages the two towers' class scores into one output
    (sum fusion at the prediction layer, no parameters).

    Conv and conv3d fusion are followed by a ReLU (`insert_conv_layers.m`, `relu3D5`); bilinear
    fusion replaces the rest of the appearance tower by a linear classifier on the D^2 features
    (the paper trains an SVM on them). Concatenation widens the layer after the fusion point.
    """

    def __init__(
        self,
        appearance: nn.Module,
        motion: nn.Module,
        *,
        fusion: str = "sum",
        fuse_at: str = "softmax",
        truncate: bool = False,
        pool3d: bool | None = None,
        freeze_towers: bool = False,
        num_classes: int = 101,
    ) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; known: {', '.join(FUSIONS)}")
        flags = {"truncate": truncate, "pool3d": pool3d, "freeze_towers": freeze_towers}
        for key, value in flags.items():
            if not isinstance(value, bool) and not (key == "pool3d" and value is None):
                raise ValueError(f"{key} must be true or false, got {value!r}")
        if not isinstance(fuse_at, str) or not fuse_at:
            raise ValueError(f"fuse_at must be a layer name or 'softmax', got {fuse_at!r}")
        self.appearance, self.motion = appearance, motion
        self.kind, self.fuse_at, self.truncate = fusion, fuse_at, truncate
        self.pool3d = fusion == "conv3d" if pool3d is None else pool3d
        self.fusion: Fusion | None = None
        self.more_fusions = nn.ModuleList()  # fusion layers of the 2nd, 3rd, ... point of a list
        self.classifier: nn.Linear | None = None
        self.cuts: list[tuple[str, str]] = []  # every map fusion point, in order, in each tower
        self.fuse_scores = False  # a "+" list ending in fc8: the towers' scores are averaged
        if fuse_at == "softmax":
            if fusion != "sum" or truncate:
                raise ValueError(
                    "fusion at the softmax layer averages both whole towers' scores: use "
                    f"fusion='sum' and truncate=False (got fusion={fusion!r}, truncate={truncate})"
                )
        elif "+" in fuse_at:
            self._inject_several(fuse_at.split("+"), num_classes)
        else:
            self._inject(num_classes)
        if self.pool3d:
            set_pool3d(appearance)
            if not truncate:
                set_pool3d(motion)
        self.freeze_towers = freeze_towers
        if freeze_towers:
            if self.cut is None:
                raise ValueError("freeze_towers needs a fusion layer: fuse_at is 'softmax'")
            for tower, cut in zip((appearance, motion), self.cut, strict=True):
                for p in below(tower, cut).parameters():
                    p.requires_grad_(False)

    @property
    def cut(self) -> tuple[str, str] | None:
        """The first fusion point in each tower; None for late fusion (`fuse_at="softmax"`)."""
        return self.cuts[0] if self.cuts else None

    def train(self, mode: bool = True) -> FusionNet:
        """As nn.Module.train, but frozen towers keep their BatchNorm statistics too.

        Frozen weights with running statistics that drift with the new batches would not be
        the towers that were trained (ResNet towers; VGG has no BatchNorm).
        """
        super().train(mode)
        if getattr(self, "freeze_towers", False) and self.cut is not None:
            for tower, cut in zip((self.appearance, self.motion), self.cut, strict=True):
                for m in below(tower, cut).modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def _inject(self, num_classes: int) -> None:
        cut_a, cut_m = point(self.appearance, self.fuse_at), point(self.motion, self.fuse_at)
        self.cuts = [(cut_a, cut_m)]
        da, dm = channels_at(self.appearance, cut_a), channels_at(self.motion, cut_m)
        self.fusion = make_fusion(self.kind, da, dm)
        if self.kind == "bilinear":  # no spatial map is left for the tower's later layers
            truncate_after(self.appearance, cut_a)
            self.classifier = nn.Linear(self.fusion.out_channels, num_classes)
        elif self.kind == "concat":
            widen_after(self.appearance, cut_a, self.fusion.out_channels)
        if self.truncate:
            truncate_after(self.motion, cut_m)

    def _inject_several(self, names: list[str], num_classes: int) -> None:
        """Fusion layers at each of `names` (tower order); a last `fc8` fuses the scores."""
        if self.kind not in MULTI_FUSIONS:
            raise ValueError(
                f"fusion at several layers ({self.fuse_at!r}) keeps each map's shape: use "
                f"fusion {', '.join(MULTI_FUSIONS)}, not {self.kind!r}"
            )
        if "" in names or len(set(names)) != len(names):
            raise ValueError(f"fuse_at {self.fuse_at!r}: name each layer once, joined by '+'")
        if names[-1] == SCORES:
            self.fuse_scores, names = True, names[:-1]
        if SCORES in names or "softmax" in names:
            raise ValueError(f"fuse_at {self.fuse_at!r}: fc8 (the scores) can only come last")
        self.cuts = [(point(self.appearance, n), point(self.motion, n)) for n in names]
        for side, tower in enumerate((self.appearance, self.motion)):
            order = [position(tower, cuts[side]) for cuts in self.cuts]
            if order != sorted(order):
                raise ValueError(f"fuse_at {self.fuse_at!r}: list the layers in network order")
        if self.fuse_scores and self.truncate:
            raise ValueError(
                f"fuse_at {self.fuse_at!r} averages both towers' scores, so the motion tower is "
                "kept whole: set truncate=false"
            )
        for i, (cut_a, cut_m) in enumerate(self.cuts):
            layer = make_fusion(
                self.kind, channels_at(self.appearance, cut_a), channels_at(self.motion, cut_m)
            )
            if i == 0:
                self.fusion = layer
            else:
                self.more_fusions.append(layer)
        if self.truncate:
            truncate_after(self.motion, self.cuts[-1][1])

    def fresh_keys(self) -> list[str]:
        """Keys no single-stream checkpoint holds: the fusion layers and a bilinear classifier."""
        new = ("fusion.", "more_fusions.", "classifier.")
        return [k for k in self.state_dict() if k.startswith(new)]

    def summary_modules(self) -> dict[str, nn.Module]:
        """Rows of `strnet summary` beside the towers' own: the fusion layer's output."""
        rows: dict[str, nn.Module] = {} if self.fusion is None else {self.kind: self.fusion}
        for i, layer in enumerate(self.more_fusions, 2):
            rows[f"{self.kind}{i}"] = layer
        if self.classifier is not None:
            rows["fc"] = self.classifier
        return rows

    def forward(self, rgb: torch.Tensor, flow: torch.Tensor) -> dict[str, torch.Tensor]:
        check_clip_pair(rgb, flow)
        rgb, flow = self.appearance.check_input(rgb), self.motion.check_input(flow)
        if self.cut is None:  # late fusion: the trainer and evaluation average the two
            return {"appearance": run(self.appearance, rgb, None, None),
                    "motion": run(self.motion, flow, None, None)}  # fmt: skip
        y, xm, after_a, after_m = rgb, flow, None, None
        for layer, (cut_a, cut_m) in zip([self.fusion, *self.more_fusions], self.cuts, strict=True):
            xa, xm = run(self.appearance, y, after_a, cut_a), run(self.motion, xm, after_m, cut_m)
            y, after_a, after_m = layer(xa, xm), cut_a, cut_m
            if self.classifier is None and self.kind in ("conv", "conv3d"):
                y = F.relu(y)
        if self.classifier is not None:
            out = {"fusion": self.classifier(y)}
        else:
            out = {"fusion": run(self.appearance, y, after_a, None)}
        if self.fuse_scores:  # Table 2's "+ FC8": one output, the towers' scores averaged
            return {"fusion": (out["fusion"] + run(self.motion, xm, after_m, None)) / 2}
        if not self.truncate:
            out["motion"] = run(self.motion, xm, after_m, None)
        return out

    def extra_repr(self) -> str:
        return (
            f"fusion={self.kind}, fuse_at={self.fuse_at}, truncate={self.truncate}, "
            f"pool3d={self.pool3d}"
        )


FUSION_ARGS = ("fusion", "fuse_at", "truncate", "pool3d", "freeze_towers")  # create_model keys


def fusion_net(
    backbone: str,
    *,
    num_classes: int = 101,
    width: int = 64,
    flow_stack: int = 10,
    fusion: str = "sum",
    fuse_at: str = "softmax",
    truncate: bool = False,
    pool3d: bool | None = None,
    freeze_towers: bool = False,
    dropout: float | None = None,
    motion_net: str | None = None,
    bn_sub_batch: int | None = None,
    stride_in_1x1: bool = False,
) -> FusionNet:
    """Appearance (3 channels) and motion (2L channels) towers of `backbone` ("vggm2048",
    "vgg16", "resnet50"), fused as `FusionNet` says. VGG: `dropout` on fc6/fc7 (default 0.85,
    Sec. 3.5) and `motion_net` another VGG for the motion tower (Table 4: VGG-16 appearance,
    VGG-M motion; relu5 maps 14 x 14 and 13 x 13 are padded to fuse). ResNet-50: `bn_sub_batch`,
    `stride_in_1x1` as `strnet.resnet`."""
    if backbone == "resnet50":
        if dropout is not None or motion_net not in (None, "resnet50"):
            raise ValueError("dropout and motion_net are options of the VGG fusion models")
        kw = dict(num_classes=num_classes, width=width, bn_sub_batch=bn_sub_batch,
                  stride_in_1x1=stride_in_1x1)  # fmt: skip
        appearance = resnet(50, in_channels=3, **kw)
        motion = resnet(50, in_channels=2 * flow_stack, **kw)
    else:
        if bn_sub_batch is not None or stride_in_1x1:
            raise ValueError("bn_sub_batch and stride_in_1x1 are options of fusion_resnet50")
        kw = dict(num_classes=num_classes, width=width)
        if dropout is not None:
            kw["dropout"] = dropout
        appearance = vgg(backbone, in_channels=3, **kw)
        motion = vgg(motion_net or backbone, in_channels=2 * flow_stack, **kw)
    flags = dict(truncate=truncate, pool3d=pool3d, freeze_towers=freeze_towers)
    return FusionNet(appearance, motion, fusion=fusion, fuse_at=fuse_at, num_classes=num_classes,
                     **flags)  # fmt: skip
