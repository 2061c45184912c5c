"""Two-stream ResNets: the late-fusion baseline, ST-ResNet, ST-ResNet* and STM-ResNet.

Feichtenhofer, Pinz, Wildes (NIPS 2016), Sec. 3 and Table 1. An appearance stream sees one RGB
frame per chunk, a motion stream a stack of L flows per chunk (2L channels, interleaved
x1, y1, x2, y2, ...). ST-ResNet adds motion residuals (eq. 2) before the second unit of every
stage and 1x1x3 temporal convs in those units (eq. 5); ST-ResNet* adds temporal max-pooling.
"""

from __future__ import annotations

import torch
from torch import nn

from strnet.layers import MotionResidual
from strnet.resnet import TEMPORAL_UNIT, ResNet

STREAMS = ("appearance", "motion")


class TwoStream(nn.Module):
    """Appearance and motion ResNets with one classifier and one loss each (Sec. 3.4).

    `forward(rgb, flow)` takes (B, T, 3, H, W) and (B, T, 2L, H, W) and returns
    `{"appearance": (B, T', K), "motion": (B, T', K)}`, scores before softmax; late fusion is
    their average (`fuse`). With `motion_residuals`, each stage's second appearance unit gets
    `MotionResidual(x_a, x_m)` as its branch input, x_m being the motion stream's input to the
    same unit (eq. 2); gradients of the appearance loss thus reach the motion stream (eq. 4).
    """

    def __init__(
        self,
        appearance: ResNet,
        motion: ResNet,
        *,
        motion_residuals: bool = False,
        interaction: str = "additive",
    ) -> None:
        super().__init__()
        if [len(s) for s in appearance.stages] != [len(s) for s in motion.stages]:
            raise ValueError("appearance and motion streams need the same number of units")
        self.appearance, self.motion = appearance, motion
        self.residuals = (
            nn.ModuleList(MotionResidual(interaction) for _ in appearance.stages)
            if motion_residuals
            else None
        )

    def forward(self, rgb: torch.Tensor, flow: torch.Tensor) -> dict[str, torch.Tensor]:
        if rgb.shape[:2] != flow.shape[:2] or rgb.shape[-2:] != flow.shape[-2:]:
            raise ValueError(
                f"rgb {tuple(rgb.shape)} and flow {tuple(flow.shape)} need the same B, T, H, W"
            )
        b, t = rgb.shape[:2]
        a_net, m_net = self.appearance, self.motion
        a_net.set_chunks(t)
        m_net.set_chunks(t)
        x_a = a_net.stem(rgb.flatten(0, 1))
        x_m = m_net.stem(flow.flatten(0, 1))
        for s, (a_stage, m_stage) in enumerate(zip(a_net.stages, m_net.stages, strict=True)):
            for u, (a_unit, m_unit) in enumerate(zip(a_stage, m_stage, strict=True)):
                branch = None
                if self.residuals is not None and u == TEMPORAL_UNIT:
                    branch = self.residuals[s](x_a, x_m)
                x_a = a_unit(x_a, t, branch)
                x_m = m_unit(x_m, t)
        return {"appearance": a_net.head(x_a, b, t), "motion": m_net.head(x_m, b, t)}


def fuse(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Late fusion (Sec. 4.1): average of the streams' non-softmaxed scores (..., K).

    The one fusion of the package: training accuracy, evaluation and fusing saved scores of
    several checkpoints all average every stream given, in the dict's order.
    """
    if not scores:
        raise ValueError("nothing to fuse: no stream scores")
    return torch.stack(list(scores.values())).mean(0)
