"""Synthetic videos with known motion: textured shapes translating over a textured background.

Tests and the laptop-sized demo use these instead of downloading a dataset; each clip's motion
is known exactly, and its class decides the direction the shape moves in.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def textured_background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random (H, W, 3) uint8 texture: flow needs gradients everywhere."""
    coarse = rng.integers(0, 256, size=(height // 8 + 2, width // 8 + 2, 3)).astype(np.float32)
    ys = np.linspace(0, coarse.shape[0] - 1.001, height)
    xs = np.linspace(0, coarse.shape[1] - 1.001, width)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    return (top * (1 - fy) + bottom * fy).clip(0, 255).astype(np.uint8)


def moving_shapes(
    num_frames: int,
    height: int,
    width: int,
    *,
    velocity: tuple[float, float] = (2.0, 1.0),
    seed: int = 0,
) -> np.ndarray:
    """(T, H, W, 3) uint8 frames: a textured square moving `velocity` = (dx, dy) px per frame
    over a background that drifts by half that velocity (camera motion)."""
    rng = np.random.default_rng(seed)
    pad = int(abs(velocity[0]) + abs(velocity[1])) * num_frames + 8
    scene = textured_background(height + 2 * pad, width + 2 * pad, rng)
    patch = textured_background(max(4, height // 3), max(4, width // 3), rng)
    patch = 255 - patch  # contrast against the background
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        bx, by = int(round(pad + t * velocity[0] / 2)), int(round(pad + t * velocity[1] / 2))
        frame = scene[by : by + height, bx : bx + width].copy()
        px = int(round(width / 3 + t * velocity[0])) % max(1, width - patch.shape[1] + 1)
        py = int(round(height / 3 + t * velocity[1])) % max(1, height - patch.shape[0] + 1)
        ph, pw = min(patch.shape[0], height - py), min(patch.shape[1], width - px)
        frame[py : py + ph, px : px + pw] = patch[:ph, :pw]
        frames[t] = frame
    return frames


def write_video(
    path: Path,
    frames: np.ndarray,
    *,
    fps: int = 25,
    codec: str = "mpeg4",
    pix_fmt: str | None = None,
) -> Path:
    """Encode (T, H, W, 3) uint8 RGB frames with PyAV. mpeg4/libx264 need even sizes; use
    codec="ffv1" (pix_fmt yuv444p) for odd ones."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt or ("yuv444p" if codec == "ffv1" else "yuv420p")
        if codec in ("mpeg4", "mjpeg"):
            stream.codec_context.options = {"qscale": "2"}  # near-lossless: tests compare pixels
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
