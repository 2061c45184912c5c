"""The layers ST-ResNet adds to a ResNet: sub-batch BN, 1x1x3 temporal convs, motion residuals.

`SubBatchNorm2d` is Table 2's "Bnorm batch size", `TemporalConv` the 1x1x3 filters of Table 1
initialised by eq. 5, `MotionResidual` the motion -> appearance connection of eq. 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INTERACTIONS = ("additive", "multiplicative")


class SubBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics come from groups of `sub_batch` samples (Table 2).

    The SGD batch stays large while each group of `sub_batch` clips is normalised by its own
    mean and variance; a clip's T chunks stay in one group (`chunks` is set by the network for
    each forward). Running statistics move by the mean of the groups' statistics, once per
    forward, so `sub_batch` >= batch is exactly `nn.BatchNorm2d`. State-dict keys are BN's.
    """

    def __init__(self, num_features: int, sub_batch: int | None = None, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if sub_batch is not None and sub_batch < 1:
            raise ValueError(f"sub_batch must be >= 1 or None, got {sub_batch}")
        self.sub_batch = sub_batch
        self.chunks = 1  # rows of the (B*T, C, H, W) input that belong to one sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = None if self.sub_batch is None else self.sub_batch * self.chunks
        if not self.training or rows is None or rows >= x.shape[0]:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        momentum = (
            1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        )
        outputs, means, variances = [], [], []
        for group in x.split(rows):
            mean, var = self.running_mean.clone(), self.running_var.clone()
            outputs.append(
                F.batch_norm(group, mean, var, self.weight, self.bias, True, momentum, self.eps)
            )
            means.append(mean)
            variances.append(var)
        with torch.no_grad():  # each group moved a copy by `momentum`; keep their average
            self.running_mean.copy_(torch.stack(means).mean(0))
            self.running_var.copy_(torch.stack(variances).mean(0))
        return torch.cat(outputs)


class TemporalConv(nn.Module):
    """A 1x1xT' convolution over the chunk axis of a (B*T, C, H, W) tensor (Table 1, T' = 3).

    `weight` is (out, in, T', 1, 1), a per-key shape change from the 2D (out, in, 1, 1) filter
    it replaces, initialised by `strnet.weights.inflate_temporal` (eq. 5). Time is padded by
    repeating the first and last chunk, so a clip constant over time sees the same input at
    every tap and an eq. 5 filter reproduces the 2D filter exactly, at the ends too.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3) -> None:
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"temporal kernel must be odd, got {kernel}")
        self.in_channels, self.out_channels, self.kernel = in_channels, out_channels, kernel
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, 1, 1))

    def forward(self, x: torch.Tensor, chunks: int) -> torch.Tensor:
        n, c, h, w = x.shape
        clip = x.view(n // chunks, chunks, c, h, w)
        half = self.kernel // 2
        idx = torch.arange(-half, chunks + half, device=x.device).clamp_(0, chunks - 1)
        padded = clip.index_select(1, idx)  # replicate padding in time
        # taps t-half..t+half stacked along channels: one 1x1 conv with (out, T' * in) weights
        taps = torch.cat([padded[:, k : k + chunks] for k in range(self.kernel)], dim=2)
        weight = self.weight.permute(0, 2, 1, 3, 4).reshape(self.out_channels, -1, 1, 1)
        return F.conv2d(taps.reshape(n, self.kernel * c, h, w), weight)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel=1x1x{self.kernel}"


class MotionResidual(nn.Module):
    """Motion -> appearance connection (eq. 2): the appearance unit's branch input.

    Additive (ST-ResNet): x_a + ReLU(x_m); multiplicative (STM-ResNet): x_a * ReLU(x_m). The
    appearance unit's identity path keeps x_a alone; no parameters, one direction only.
    """

    def __init__(self, interaction: str = "additive") -> None:
        super().__init__()
        if interaction not in INTERACTIONS:
            raise ValueError(f"interaction must be one of {INTERACTIONS}, got {interaction!r}")
        self.interaction = interaction

    def forward(self, x_a: torch.Tensor, x_m: torch.Tensor) -> torch.Tensor:
        if self.interaction == "additive":
            return x_a + F.relu(x_m)
        return x_a * F.relu(x_m)

    def extra_repr(self) -> str:
        return self.interaction
