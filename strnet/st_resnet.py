"""Two-stream ResNets: the late-fusion baseline, ST-ResNet, ST-ResNet* and STM-ResNet.

Feichtenhofer, Pinz, Wildes (NIPS 2016), Sec. 3 and Table 1, and the authors' MatConvNet code
(feichtenhofer/st-resnet). An appearance stream sees one RGB frame per chunk, a motion stream a
stack of L flows per chunk (2L channels, interleaved x1, y1, x2, y2, ...). ST-ResNet adds motion
residuals (eq. 2) before the second unit of every stage and 1x1x3 temporal convs in those units
(eq. 5); ST-ResNet* adds temporal max-pooling on the conv5 map. STM-ResNet gates with
x_a * ReLU(x_m) instead and inserts new identity-initialised temporal convs (STMulNet.m).
"""

from __future__ import annotations

import torch
from torch import nn

from strnet.layers import MotionResidual
from strnet.resnet import LINK_UNIT, ResNet

STREAMS = ("appearance", "motion")


def check_clip_pair(rgb: torch.Tensor, flow: torch.Tensor) -> None:
    """A two-stream input: clips (B, T, C, H, W) of equal B, T, H, W; else a one-line ValueError."""
    for name, x in (("rgb", rgb), ("flow", flow)):
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be clips (B, T, C, H, W), got {shape}")
    if rgb.shape[:2] != flow.shape[:2] or rgb.shape[-2:] != flow.shape[-2:]:
        raise ValueError(
            f"rgb {tuple(rgb.shape)} and flow {tuple(flow.shape)} need the same B, T, H, W"
        )


class TwoStream(nn.Module):
    """Appearance and motion ResNets with one classifier and one loss each (Sec. 3.4).

    `forward(rgb, flow)` takes (B, T, 3, H, W) and (B, T, 2L, H, W) and returns
    `{"appearance": (B, T', K), "motion": (B, T', K)}`, scores before softmax; late fusion is
    their average (`fuse`). If the appearance stream was built with `links` (ST-/STM-ResNet), the
    motion stream runs first and hands over its input to `LINK_UNIT` of every stage (x_m of eq. 2);
    the appearance stream's link units feed `MotionResidual(x_a, x_m)` to their residual branch,
    so gradients of the appearance loss reach the motion stream (eq. 4). Both streams, their
    stages and units are called as modules: forward hooks on any of them fire once per forward.
    """

    def __init__(self, appearance: ResNet, motion: ResNet) -> None:
        super().__init__()
        if [len(s) for s in appearance.stages] != [len(s) for s in motion.stages]:
            raise ValueError("appearance and motion streams need the same number of units")
        if motion.links is not None:
            raise ValueError("motion -> appearance only: the motion stream takes no motion links")
        self.appearance, self.motion = appearance, motion

    @property
    def links(self) -> list[MotionResidual]:
        """The motion residuals (eq. 2), one per stage; empty for the late-fusion baseline."""
        return [s[LINK_UNIT].link for s in self.appearance.stages if s[LINK_UNIT].link is not None]

    def fresh_keys(self) -> list[str]:
        """Keys that keep their initialisation when a 2D checkpoint is loaded (see ResNet)."""
        return [f"{name}.{k}" for name in STREAMS for k in getattr(self, name).fresh_keys()]

    def forward(self, rgb: torch.Tensor, flow: torch.Tensor) -> dict[str, torch.Tensor]:
        check_clip_pair(rgb, flow)
        taps: list[torch.Tensor] | None = [] if self.links else None
        motion = self.motion(flow, taps=taps)
        appearance = self.appearance(rgb, motion=taps)
        return {"appearance": appearance, "motion": motion}


def fuse(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Late fusion (Sec. 4.1): average of the streams' non-softmaxed scores (..., K).

    The one fusion of the package: training accuracy, evaluation and fusing saved scores of
    several checkpoints all average every stream given, in the dict's order.
    """
    if not scores:
        raise ValueError("nothing to fuse: no stream scores")
    return torch.stack(list(scores.values())).mean(0)
