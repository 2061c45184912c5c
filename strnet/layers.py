"""The layers ST-ResNet adds to a ResNet, and the 2D layers that carry clips through it.

Every layer here takes a clip batch (B, T, C, H, W) — B clips of T chunks — or a frame batch
(N, C, H, W), which is N clips of one chunk; a layer that needs the clip structure (sub-batch BN,
temporal convs, temporal pooling) reads it from the tensor's shape, so no state is set before a
forward and every layer is an ordinary module that forward hooks see.

`SubBatchNorm2d` is Table 2's "Bnorm batch size", `TemporalConv` the 1x1x3 filters of Table 1
(eq. 5) and of STMulNet.m, `MotionResidual` the motion -> appearance connection of eq. 2,
`TemporalMaxPool` ST-ResNet*'s and STM-ResNet's max-pooling over chunks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

INTERACTIONS = ("additive", "multiplicative")
RESIDUAL_INPUTS = ("pre_relu", "post_relu")
TIME_PADDINGS = ("replicate", "zeros")


def check_clip_dims(x: torch.Tensor, what: str) -> None:
    if x.dim() not in (4, 5):
        raise ValueError(
            f"{what} takes clips (B, T, C, H, W) or frames (N, C, H, W), got shape {tuple(x.shape)}"
        )


def as_clips(x: torch.Tensor) -> torch.Tensor:
    """(B, T, C, H, W) as it is; frames (N, C, H, W) as N clips of one chunk."""
    return x if x.dim() == 5 else x[:, None]


def per_chunk(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D op to every chunk of (B, T, C, H, W) (as B*T frames), or to (N, C, H, W)."""
    if x.dim() == 5:
        return fn(x.flatten(0, 1)).unflatten(0, x.shape[:2])
    return fn(x)


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters and keys) applied to every chunk of a clip batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_chunk(super().forward, x)


class MaxPool2d(nn.MaxPool2d):
    """`nn.MaxPool2d` applied to every chunk of a clip batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_chunk(super().forward, x)


def apply_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a normalisation layer on a clip batch: `SubBatchNorm2d` reads the clips itself, any
    other (e.g. `nn.SyncBatchNorm` after `convert_sync_batchnorm`) sees the B*T frames."""
    return norm(x) if isinstance(norm, SubBatchNorm2d) else per_chunk(norm, x)


class SubBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics come from groups of `sub_batch` clips (Table 2).

    The SGD batch stays large while each group of `sub_batch` clips (all their chunks) is
    normalised by its own mean and variance; the clips are the first axis of the (B, T, C, H, W)
    input (a frame batch (N, C, H, W) is N one-chunk clips). All whole groups are normalised by one
    `batch_norm` call on a view with the groups side by side as channels; a last, smaller group
    (B not a multiple of `sub_batch`) by a second. Running statistics move by the mean of the
    groups' statistics, once per forward, so `sub_batch` >= B is exactly `nn.BatchNorm2d`.
    State-dict keys are BN's.
    """

    def __init__(self, num_features: int, sub_batch: int | None = None, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if sub_batch is not None and sub_batch < 1:
            raise ValueError(f"sub_batch must be >= 1 or None, got {sub_batch}")
        self.sub_batch = sub_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_clip_dims(x, type(self).__name__)
        clips = x.shape[0]
        k = self.sub_batch
        if not self.training or k is None or k >= clips:
            return per_chunk(super().forward, x)
        self._check_input_dim(x.flatten(0, 1) if x.dim() == 5 else x)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        momentum = self.momentum
        if momentum is None:  # cumulative moving average, as nn.BatchNorm2d
            momentum = 1.0 / float(self.num_batches_tracked)
        clip = as_clips(x)
        whole = clips - clips % k
        parts, stats = [], []
        for lo, hi in ((0, whole), (whole, clips)):
            if hi > lo:
                out, mean, var = self._grouped(clip[lo:hi], (hi - lo) // k or 1, momentum)
                parts.append(out)
                stats.append((mean, var))
        if self.running_mean is not None:
            with torch.no_grad():  # each group moved a copy by `momentum`: keep their average
                self.running_mean.copy_(torch.cat([m for m, _ in stats]).mean(0))
                self.running_var.copy_(torch.cat([v for _, v in stats]).mean(0))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out if x.dim() == 5 else out[:, 0]

    def _grouped(self, clip: torch.Tensor, groups: int, momentum: float):
        """Normalise `groups` equal groups of (n, T, C, H, W) in one call: the groups become
        channel blocks of an (n/groups * T, groups * C, H * W) view. Returns the output and each
        group's updated copy of the running mean and variance, (groups, C) each."""
        n, t, c, h, w = clip.shape
        rows = n // groups * t
        grouped = clip.reshape(groups, rows, c, h * w).transpose(0, 1).reshape(rows, groups * c, -1)

        def tile(p: torch.Tensor | None) -> torch.Tensor | None:
            return None if p is None else p.repeat(groups)

        mean = None if self.running_mean is None else self.running_mean.repeat(groups)
        var = None if self.running_var is None else self.running_var.repeat(groups)
        out = F.batch_norm(
            grouped, mean, var, tile(self.weight), tile(self.bias), True, momentum, self.eps
        )
        out = out.reshape(rows, groups, c, h * w).transpose(0, 1).reshape(n, t, c, h, w)
        if mean is None:
            return out, None, None
        return out, mean.view(groups, c), var.view(groups, c)


class TemporalConv(nn.Module):
    """A 1x1xT' convolution over the chunks of a clip batch (Table 1: T' = 3).

    `weight` is (out, in, T', 1, 1), a per-key shape change from the 2D (out, in, 1, 1) filter it
    replaces. Input (B, T, in, H, W) -> (B, T, out, H, W); a frame batch (N, in, H, W) is N clips
    of one chunk. Time is padded by repeating the first and last chunk ("replicate", ST-ResNet's
    inflated filters: a clip constant over time sees the same input at every tap, so an eq. 5
    filter reproduces the 2D filter exactly, at the ends too) or with zeros ("zeros", as the
    authors' `dagnn.ConvTime`; STM-ResNet's identity-initialised filters).

    Computed as one 1x1 conv with the T' taps stacked as output channels, then a shift-add over
    time: the only tensor kept for backward is the input, which the previous layer keeps anyway
    (no padded or T'-times-wider copy of it).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int = 3,
        *,
        bias: bool = False,
        padding: str = "replicate",
    ) -> None:
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"temporal kernel must be odd, got {kernel}")
        if padding not in TIME_PADDINGS:
            raise ValueError(f"temporal padding must be one of {TIME_PADDINGS}, got {padding!r}")
        self.in_channels, self.out_channels, self.kernel = in_channels, out_channels, kernel
        self.padding = padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_clip_dims(x, type(self).__name__)
        clip = as_clips(x)
        b, t, _, h, w = clip.shape
        k, out_c, half = self.kernel, self.out_channels, self.kernel // 2
        # taps as output channels: (k * out, in, 1, 1), tap j first
        weight = self.weight.permute(2, 0, 1, 3, 4).reshape(k * out_c, self.in_channels, 1, 1)
        taps = F.conv2d(clip.flatten(0, 1), weight).view(b, t, k, out_c, h, w)
        out = taps[:, :, half]
        steps = torch.arange(t, device=x.device)
        for j in range(k):
            shift = j - half  # output chunk i reads input chunk i + shift
            if shift == 0:
                continue
            if self.padding == "replicate":
                idx = (steps + shift).clamp_(0, t - 1)
                out = out + taps[:, :, j].index_select(1, idx)
            elif abs(shift) < t:
                lo, hi = max(-shift, 0), t - max(shift, 0)  # outputs that read a real chunk
                moved = taps.new_zeros(b, t, out_c, h, w)
                moved[:, lo:hi] = taps[:, lo + shift : hi + shift, j]
                out = out + moved
        if self.bias is not None:
            out = out + self.bias.view(1, 1, -1, 1, 1)
        return out if x.dim() == 5 else out[:, 0]

    def extra_repr(self) -> str:
        bias = ", bias" if self.bias is not None else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel=1x1x{self.kernel}, "
            f"padding={self.padding}{bias}"
        )


class MotionResidual(nn.Module):
    """Motion -> appearance connection (eq. 2): the appearance unit's residual-branch input.

    Additive (ST-ResNet): x_a + ReLU(x_m); multiplicative (STM-ResNet, STMulNet.m's `dagnn.Mul`):
    x_a * ReLU(x_m). `residual_input` says which x_a the unit passes: "pre_relu" (the previous
    unit's sum before its ReLU: eq. 2 read literally and the authors' networks) or "post_relu"
    (that unit's output). The appearance unit's identity path keeps its ordinary input alone; no
    parameters, one direction only.
    """

    def __init__(self, interaction: str = "additive", residual_input: str = "pre_relu") -> None:
        super().__init__()
        if interaction not in INTERACTIONS:
            raise ValueError(f"interaction must be one of {INTERACTIONS}, got {interaction!r}")
        if residual_input not in RESIDUAL_INPUTS:
            raise ValueError(
                f"residual_input must be one of {RESIDUAL_INPUTS}, got {residual_input!r}"
            )
        self.interaction, self.residual_input = interaction, residual_input

    def forward(self, x_a: torch.Tensor, x_m: torch.Tensor) -> torch.Tensor:
        if x_a.shape != x_m.shape:
            raise ValueError(
                f"motion residual: appearance {tuple(x_a.shape)} and motion {tuple(x_m.shape)} "
                "features differ in shape"
            )
        if self.interaction == "additive":
            return x_a + F.relu(x_m)
        return x_a * F.relu(x_m)

    def extra_repr(self) -> str:
        return f"{self.interaction}, residual_input={self.residual_input}"


def dropped_chunks(chunks: int, window: int, stride: int) -> int:
    """Chunks at the end of a clip that no window of `window` (stride `stride`) covers."""
    window = min(window, chunks)
    return (chunks - window) % stride


class TemporalMaxPool(nn.Module):
    """Max over windows of `window` chunks, stride `stride`: (B, T, C, h, w) -> (B, T', C, h, w).

    ST-ResNet* (window 5, stride 2) and STM-ResNet (window 5, stride 1) pool the conv5 map this way
    before pool5 (STResNet_stage2.m / STMulNet.m: `PoolTime` on res5c_relu). A clip of fewer than
    `window` chunks is pooled over all of them. A T that leaves chunks at the end uncovered
    (stride 2 and an even T > 5: T = 12 would pool chunks 0-10 only) is refused.
    """

    def __init__(self, window: int, stride: int) -> None:
        super().__init__()
        if window < 1 or stride < 1:
            raise ValueError(f"temporal pool window and stride must be >= 1: {window}, {stride}")
        self.window, self.stride = window, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"temporal pooling takes (B, T, C, h, w), got shape {tuple(x.shape)}")
        t = x.shape[1]
        if dropped_chunks(t, self.window, self.stride):
            raise ValueError(
                f"max-pooling windows of {self.window} chunks with stride {self.stride} leave the "
                f"last chunk of {t} out; use {t - 1} or {t + 1} chunks"
            )
        window = min(self.window, t)
        pooled = F.max_pool3d(x.transpose(1, 2), (window, 1, 1), (self.stride, 1, 1))
        return pooled.transpose(1, 2)

    def extra_repr(self) -> str:
        return f"window={self.window}, stride={self.stride}"


class Pool5(nn.Module):
    """pool5: a `size` x `size` average at every location of each chunk's conv5 map.

    (B, T, C, h, w) -> (B, T, C, h - size + 1, w - size + 1) (windows shrink to maps smaller than
    `size`); at 224^2 the map is 7 x 7 and this is the global average pool.
    """

    def __init__(self, size: int = 7) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = (min(self.size, x.shape[-2]), min(self.size, x.shape[-1]))
        return per_chunk(lambda f: F.avg_pool2d(f, kernel, stride=1), x)

    def extra_repr(self) -> str:
        return f"{self.size}x{self.size} average, stride 1"
