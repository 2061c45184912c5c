"""Pictures of flow a person can check: the Middlebury colour wheel and `flowprep viz` panels.

A panel shows, side by side, the RGB frame, its flow in the colour wheel of Baker et al. (Middlebury
benchmark: hue = direction, saturation = magnitude) and the two quantized flow JPEGs as stored.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import cv2
import numpy as np

from flowprep.layout import INDEX_BASE, META, frame_glob, frame_index, frame_name
from flowprep.quantize import DEFAULT_BOUND, dequantize_flow
from flowprep.reader import ReaderError, open_reader

# Hue segments of the Middlebury wheel: red-yellow, yellow-green, green-cyan, cyan-blue,
# blue-magenta, magenta-red (Baker et al., "A Database and Evaluation Methodology for Optical
# Flow", IJCV 2011).
WHEEL_SEGMENTS = (15, 6, 4, 11, 13, 6)


def color_wheel() -> np.ndarray:
    """(55, 3) float RGB colours in 0..1 around the Middlebury wheel, starting at red."""
    ry, yg, gc, cb, bm, mr = WHEEL_SEGMENTS
    ramps = []
    for n, (fixed, rising, falling) in zip(
        (ry, yg, gc, cb, bm, mr),
        ((0, 1, None), (1, None, 0), (1, 2, None), (2, None, 1), (2, 0, None), (0, None, 2)),
        strict=True,
    ):
        seg = np.zeros((n, 3))
        seg[:, fixed] = 1.0
        t = np.arange(n) / n
        if rising is not None:
            seg[:, rising] = t
        else:
            seg[:, falling] = 1.0 - t
        ramps.append(seg)
    return np.concatenate(ramps)


def flow_to_color(flow: np.ndarray, max_flow: float | None = None) -> np.ndarray:
    """uint8 (H, W, 3) RGB picture of (H, W, 2) flow in the Middlebury colour wheel.

    Magnitudes are divided by `max_flow` (default: the largest in the image); beyond it colours
    are darkened, as in the Middlebury code. NaN is drawn black.
    """
    flow = np.asarray(flow, dtype=np.float32)
    if flow.ndim != 3 or flow.shape[-1] != 2:
        raise ValueError(f"flow must be (H, W, 2), got {flow.shape}")
    bad = ~np.isfinite(flow).all(axis=-1)
    u, v = np.where(bad, 0, flow[..., 0]), np.where(bad, 0, flow[..., 1])
    rad = np.hypot(u, v)
    scale = float(max_flow) if max_flow else float(rad.max())
    rad = rad / max(scale, np.finfo(np.float32).eps)
    wheel = color_wheel()
    n = len(wheel)
    angle = np.arctan2(-v, -u) / np.pi  # -1..1
    fk = (angle + 1) / 2 * (n - 1)
    k0 = np.floor(fk).astype(int)
    k1 = (k0 + 1) % n
    f = (fk - k0)[..., None]
    col = (1 - f) * wheel[k0] + f * wheel[k1]
    inside = (rad <= 1)[..., None]
    col = np.where(inside, 1 - rad[..., None] * (1 - col), col * 0.75)
    col[bad] = 0
    return np.clip(np.rint(255 * col), 0, 255).astype(np.uint8)


def make_panel(
    frame: np.ndarray, qx: np.ndarray, qy: np.ndarray, bound: float, max_flow: float | None = None
) -> np.ndarray:
    """RGB (H, 4W, 3) strip: frame | colour-wheel flow | flow_x JPEG | flow_y JPEG.

    The flow is the dequantized one, i.e. what a network reading the JPEGs sees.
    """
    flow = np.stack((dequantize_flow(qx, bound), dequantize_flow(qy, bound)), axis=-1)
    gray = [np.repeat(q[..., None], 3, axis=-1) for q in (qx, qy)]
    return np.concatenate((frame, flow_to_color(flow, max_flow), *gray), axis=1)


def _read(path: Path, flags: int) -> np.ndarray:
    img = cv2.imread(str(path), flags)
    if img is None:
        raise ValueError(f"cannot read image {path}")
    return img


class _FlowFiles:
    """The flow JPEGs of one video folder, found by name (a meta.json with counts not needed)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.where = str(self.folder)
        names = sorted(p.name for p in self.folder.glob(frame_glob("flow_x")))
        self.indices = [frame_index(name) for name in names]

    @functools.cached_property
    def meta(self) -> dict:  # read only when the bound is not given
        path = self.folder / META
        return json.loads(path.read_text()) if path.is_file() else {}

    def quantized(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        qx = _read(self.folder / frame_name("flow_x", index), cv2.IMREAD_GRAYSCALE)
        return qx, _read(self.folder / frame_name("flow_y", index), cv2.IMREAD_GRAYSCALE)

    def frame(self, index: int) -> np.ndarray | None:
        path = self.folder / frame_name("img", index)
        if not path.is_file():
            return None
        return cv2.cvtColor(_read(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


class _ReaderFlow:
    """The flow of one video of a frame-folder root or shard directory, through flowprep.reader."""

    def __init__(self, root: Path, video_id: str):
        reader = open_reader(root)
        if video_id not in reader:
            raise ReaderError(f"{root}: no video {video_id!r}")
        self.video = reader[video_id]
        self.meta = self.video.meta
        self.where = f"{root}:{video_id}"
        jpeg = self.meta.get("flow_format") != "npy"  # raw .npy flow has no JPEGs to draw
        self.indices = list(range(self.video.num_flows)) if jpeg else []
        settings = self.meta.get("settings")
        self.has_rgb = not isinstance(settings, dict) or settings.get("modality") != "flow"

    def quantized(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        q = self.video.flow([index])[0]
        return q[..., 0], q[..., 1]

    def frame(self, index: int) -> np.ndarray | None:
        if not self.has_rgb or index >= self.video.num_frames:
            return None
        return self.video.rgb([index])[0]


def write_panels(
    folder: Path,
    out: Path,
    *,
    limit: int | None = None,
    bound: float | None = None,
    max_flow: float | None = None,
    video_id: str | None = None,
) -> list[Path]:
    """Write viz_00001.png ... for the flow frames of one extracted video into `out`.

    `folder` is a video folder; with `video_id` it is a frame-folder root or a shard directory,
    read through `flowprep.reader` (ReaderError for a bad or missing video). The bound comes
    from meta.json when not given (else 20 px); returns the PNG paths.
    """
    out = Path(out)
    video = _FlowFiles(folder) if video_id is None else _ReaderFlow(Path(folder), video_id)
    if bound is None:
        bound = float(video.meta.get("flow_bound", DEFAULT_BOUND))
    if not video.indices:
        raise ValueError(f"no flow_x_*.jpg in {video.where}; extract with --modality flow or both")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index in video.indices[:limit]:
        qx, qy = video.quantized(index)
        frame = video.frame(index)
        if frame is None:
            frame = np.zeros((*qx.shape, 3), np.uint8)
        panel = make_panel(frame, qx, qy, bound, max_flow)
        target = out / f"viz_{index + INDEX_BASE:05d}.png"
        cv2.imwrite(str(target), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
        written.append(target)
    return written
