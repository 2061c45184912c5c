"""What `flowprep extract` writes (ExtractSettings, hashed into every marker) and how it runs.

Kept apart from the extractor so that `strnet predict` and the benchmarks can build the same
settings without importing the scheduler.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from flowprep.flow_service import DEVICE_BATCH

MODALITIES = ("rgb", "flow", "both")


@dataclass(frozen=True)
class ExtractSettings:
    """Everything that changes what extraction writes; its hash guards resume."""

    short_side: int = 256  # resize so the short side has this length; 0 keeps the source size
    jpeg_quality: int = 95  # JPEG quality of RGB and flow images (denseflow and cv2 default)
    modality: str = "rgb"  # rgb | flow | both
    flow_backend: str = "torch"  # torch | opencv (flowprep.flow.compute_flow backends)
    flow_bound: float = 20.0  # flow is clipped to +-bound px before quantization (papers: 20)
    flow_format: str = "jpeg"  # jpeg (quantized, flow_x/flow_y) | npy (raw float32 per pair)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg quality must be 1..100, got {self.jpeg_quality}")
        if self.short_side < 0:
            raise ValueError(f"short side must be >= 0, got {self.short_side}")
        if self.flow_bound <= 0:
            raise ValueError(f"flow bound must be > 0, got {self.flow_bound}")
        if self.flow_format not in ("jpeg", "npy"):
            raise ValueError(f"flow format must be jpeg or npy, got {self.flow_format!r}")

    @property
    def wants_rgb(self) -> bool:
        return self.modality in ("rgb", "both")

    @property
    def wants_flow(self) -> bool:
        return self.modality in ("flow", "both")

    def to_dict(self) -> dict:
        """The settings that shape the output (flow ones only when flow is written)."""
        data = asdict(self)
        if not self.wants_flow:
            for key in ("flow_backend", "flow_bound", "flow_format"):
                data.pop(key)
        return data

    def digest(self) -> str:
        """A short stable hash of `to_dict()`, stored in every marker and meta.json."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run, not what to write: these never invalidate finished videos."""

    device: str = "auto"  # flow device: auto | cpu | cuda
    flow_batch: int = 8  # frame pairs per chunk a video sends for flow
    flow_compile: bool | str = "auto"  # torch.compile TV-L1: True, False, or "auto" (>= 160x120)
    device_batch: int = DEVICE_BATCH  # pairs per device call, joined from several videos' chunks
    threads: int = 0  # decoder threads per video (0 = FFmpeg's choice)
