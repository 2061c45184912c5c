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


def class_velocity(label_index: int, num_classes: int, speed: float = 3.0) -> tuple[float, float]:
    """The motion of class `label_index`: `speed` px/frame in its own direction of the circle."""
    angle = 2 * np.pi * label_index / num_classes
    return float(speed * np.cos(angle)), float(speed * np.sin(angle))


def write_ucf_like_dataset(
    root: Path,
    *,
    num_classes: int = 4,
    groups: int = 6,
    clips_per_group: int = 1,
    num_frames: int = 24,
    size: tuple[int, int] = (120, 160),
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write a small dataset in UCF101's layout; return (video root, split folder).

    UCF-101/<Class>/v_<Class>_g<GG>_c<CC>.avi and ucfTrainTestlist/ with classInd.txt and three
    train/test lists that hold out groups, as UCF101 does. A class is a motion direction, so
    the motion stream can learn it while single frames carry little label information.
    """
    videos, splits = Path(root) / "UCF-101", Path(root) / "ucfTrainTestlist"
    splits.mkdir(parents=True, exist_ok=True)
    names = [f"Class{c:02d}" for c in range(num_classes)]
    (splits / "classInd.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(names)))
    clips = []
    for c, name in enumerate(names):
        for g in range(1, groups + 1):
            for k in range(1, clips_per_group + 1):
                rel = f"{name}/v_{name}_g{g:02d}_c{k:02d}.avi"
                vseed = seed * 100_003 + c * 1009 + g * 31 + k
                frames = moving_shapes(
                    num_frames, *size, velocity=class_velocity(c, num_classes), seed=vseed
                )
                write_video(videos / rel, frames)
                clips.append((rel, c, g))
    for split in (1, 2, 3):
        test_groups = {g for g in range(1, groups + 1) if (g - 1) % 3 == split - 1}
        train = [f"{rel} {c + 1}\n" for rel, c, g in clips if g not in test_groups]
        test = [f"{rel}\n" for rel, _c, g in clips if g in test_groups]
        (splits / f"trainlist0{split}.txt").write_text("".join(train))
        (splits / f"testlist0{split}.txt").write_text("".join(test))
    return videos, splits
