"""Synthetic videos with known motion, and datasets of them in UCF101's layout.

Tests and the laptop-sized demo use these instead of downloading a dataset; each clip's motion
is known exactly. `write_ucf_like_dataset`: one class per motion direction (flow suffices).
`write_action_set`: eight classes in four kinds that each need other evidence (appearance,
motion, both at the same place, order in time); what the classes look like is
`pipelines.render`, this module puts them on disk.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np

from flowprep.atomic import write_json_atomic, write_text_atomic
from pipelines.render import ACTION_CLASSES, KINDS, render_clip, sample_clip, textured_background

__all__ = [
    "ACTION_CLASSES",
    "KINDS",
    "class_velocity",
    "moving_shapes",
    "textured_background",
    "write_action_set",
    "write_ucf_like_dataset",
    "write_video",
]


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
    threads: int | None = None,
    fixed_qscale: bool = False,
) -> Path:
    """Encode (T, H, W, 3) uint8 RGB frames with PyAV. mpeg4/libx264 need even sizes; use
    codec="ffv1" (pix_fmt yuv444p) for odd ones. `threads=1` gives the same bytes on every
    machine (mpeg4 cuts a frame into one slice per thread; None lets FFmpeg pick).

    The "qscale" option below is not an option of the encoder and changes nothing (mpeg4 runs
    at its default bit rate; on a textured 48x48 clip luma drifts to ~3.5 levels off by frame
    12); `fixed_qscale=True` sets the fixed-quantizer flag, which does give qscale 2 (the
    encoder's qmin; ~1 level). The default keeps the bytes existing tests were tuned on."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt or ("yuv444p" if codec == "ffv1" else "yuv420p")
        if codec in ("mpeg4", "mjpeg"):
            stream.codec_context.options = {"qscale": "2"}  # near-lossless: tests compare pixels
        if fixed_qscale:
            stream.codec_context.options = {**stream.codec_context.options, "flags": "+qscale"}
        if threads is not None:
            stream.codec_context.thread_count = threads
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


SETTINGS_MARKER = ".synth.json"  # the settings the videos under videos/ were rendered with
RENDERER_VERSION = 1  # bump when a change to pipelines.render changes the pixels
_VIDEO_NAME = re.compile(r"^v_(?P<name>[A-Za-z]+)_g\d{2,}_c\d{2,}\.avi$")


def action_clip_names(per_class: int) -> list[tuple[int, int]]:
    """(group, clip) numbers of a class's `per_class` videos, as UCF101 numbers them (1-based).

    Clips are dealt round-robin over max(3, per_class / 4) groups (at most 25, as UCF101), so
    each group holds a few clips and split s can test the groups with (g - 1) % 3 == s - 1.
    """
    groups = min(25, max(3, math.ceil(per_class / 4)))
    return [(i % groups + 1, i // groups + 1) for i in range(per_class)]


def _check_action_args(
    classes: Sequence[str] | None, per_class: int, frames: int, size: tuple[int, int], seed: int
) -> list[str]:
    """The class names to render; ValueError (one line) for anything the renderer cannot do."""
    names = list(ACTION_CLASSES) if classes is None else list(classes)
    unknown = [c for c in names if c not in ACTION_CLASSES]
    if unknown:
        raise ValueError(
            f"unknown class names {', '.join(unknown)}; known: {', '.join(ACTION_CLASSES)}"
        )
    if not names or len(set(names)) != len(names):
        raise ValueError(f"classes must be distinct and at least one, got {names}")
    width, height = size
    if width % 2 or height % 2:
        raise ValueError(f"size {width}x{height}: mpeg4 needs an even width and height")
    if min(width, height) < 16:
        raise ValueError(f"size {width}x{height}: width and height must be at least 16")
    if per_class < 1 or frames < 2 or seed < 0:
        got = f"per_class={per_class}, frames={frames}, seed={seed}"
        raise ValueError(f"need per_class >= 1, frames >= 2 and seed >= 0; got {got}")
    return names


def _clear_stale_videos(videos: Path, expected: set[str], keep: bool) -> None:
    """Delete the videos of ours under `videos` that are not `expected` (all of them unless
    `keep`, i.e. when they were rendered with other settings); leave anything else alone."""
    for name in ACTION_CLASSES:
        folder = videos / name
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = _VIDEO_NAME.match(path.name)
            rel = f"{name}/{path.name}"
            if match and match["name"] == name and not (keep and rel in expected):
                path.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()


def write_action_set(
    out: Path,
    *,
    classes: Sequence[str] | None = None,
    per_class: int = 12,
    frames: int = 32,
    size: tuple[int, int] = (96, 96),
    seed: int = 0,
) -> dict:
    """Render the synthetic action set (`pipelines.render`) in UCF101's layout; return the
    classes.json dict. `size` is (width, height), both even (mpeg4).

    Writes under `out`: videos/<Class>/v_<Class>_g<GG>_c<CC>.avi, classInd.txt (ids in the order
    of `classes`, default all of ACTION_CLASSES), trainlist0s.txt / testlist0s.txt (split s tests
    the groups with (g - 1) % 3 == s - 1), classes.json ({"classes": [{name, kind, index}],
    "settings": {...}}). Each video has its own generator seeded by (seed, class, clip), so the
    same arguments give the same bytes, and a class's videos do not depend on the other classes.
    Videos go to a temporary name and are renamed into place; a rerun with the same settings
    (the .synth.json marker, written before any video) keeps the videos already there, others
    are re-rendered; classes.json is written last. Unknown classes, odd sizes: ValueError.
    """
    names = _check_action_args(classes, per_class, frames, size, seed)
    out = Path(out)
    videos, partial = out / "videos", out / ".partial"
    settings = {
        "per_class": per_class,
        "frames": frames,
        "size": [int(v) for v in size],
        "seed": seed,
    }
    info = {
        "classes": [
            {"name": n, "kind": ACTION_CLASSES[n], "index": i} for i, n in enumerate(names)
        ],
        "settings": settings,
    }
    numbers = sorted((g, c, i) for i, (g, c) in enumerate(action_clip_names(per_class)))
    clips = [(n, i, g, c) for n in names for g, c, i in numbers]  # listed as UCF101: by g, c
    rel = {(n, i): f"{n}/v_{n}_g{g:02d}_c{c:02d}.avi" for n, i, g, c in clips}

    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    marker = {"settings": settings, "renderer": RENDERER_VERSION}
    if _read_json(out / "classes.json") != info:
        (out / "classes.json").unlink(missing_ok=True)  # written last: its presence means done
    keep = _read_json(out / SETTINGS_MARKER) == marker
    _clear_stale_videos(videos, set(rel.values()), keep)
    write_json_atomic(out / SETTINGS_MARKER, marker)

    class_ids = list(ACTION_CLASSES)
    for name, i, _g, _c in clips:
        target = videos / rel[name, i]
        if target.exists():
            continue
        rng = np.random.default_rng([seed, class_ids.index(name), i])
        clip = sample_clip(name, rng, frames=frames, size=tuple(size))
        tmp = write_video(partial / target.name, render_clip(clip), threads=1, fixed_qscale=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
    shutil.rmtree(partial, ignore_errors=True)

    write_text_atomic(out / "classInd.txt", "".join(f"{i + 1} {n}\n" for i, n in enumerate(names)))
    for split in (1, 2, 3):
        test = [(n, i) for n, i, g, _c in clips if (g - 1) % 3 == split - 1]
        train = [(n, i) for n, i, g, _c in clips if (g - 1) % 3 != split - 1]
        write_text_atomic(
            out / f"trainlist0{split}.txt",
            "".join(f"{rel[k]} {names.index(k[0]) + 1}\n" for k in train),
        )
        write_text_atomic(out / f"testlist0{split}.txt", "".join(f"{rel[k]}\n" for k in test))
    write_json_atomic(out / "classes.json", info)
    return info


def _read_json(path: Path) -> object:
    """The JSON in `path`, or None when it is missing or not JSON (a marker from a killed run)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
