"""Saved per-video scores and the file names of eval outputs: one owner for both contracts.

`strnet eval --out O --name NAME --split N` writes `O/NAME_splitN.json` (metrics),
`O/NAME_splitN_confusion.png` and `O/NAME_splitN_scores.npz`. The npz holds `video_ids` (str),
`labels` (int64), `class_names` (str), `protocol` (0-d str) and one float32 array
`scores_<stream>` (N, K) per stream, before softmax. It is read with `allow_pickle=False`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from strnet.checkpoint import write_atomic
from strnet.config import ConfigError
from strnet.st_resnet import fuse

NAME_PATTERN = re.compile(r"[A-Za-z0-9_+\-][A-Za-z0-9._+\-]*", re.ASCII)
SCORES_SUFFIX = re.compile(r"_split\d+_scores$")
STREAM_PREFIX = "scores_"


def check_name(name: str) -> str:
    """`name` if it is a safe file-name component (letters, digits, `._+-`, no leading dot)."""
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(
            f"--name {name!r} is not a safe file name: use letters, digits and ._+- "
            "(not starting with .)"
        )
    return name


def default_name(path: str | Path) -> str:
    """Output name of one input: its run folder (`runs/appearance/checkpoint.pt` -> appearance).

    Other checkpoint files add their stem (`best.pt` -> appearance-best); a saved scores file
    keeps its own name (`motion_split1_scores.npz` -> motion). Unsafe characters become `-`.
    """
    p = Path(path).resolve()
    if p.suffix == ".npz":
        name = SCORES_SUFFIX.sub("", p.stem)
    else:
        name = p.parent.name if p.stem == "checkpoint" else f"{p.parent.name}-{p.stem}"
    name = re.sub(r"[^A-Za-z0-9._+\-]", "-", name).lstrip(".")
    return name or "eval"


def output_paths(out: str | Path, name: str, split: int) -> dict[str, Path]:
    """The three files of one evaluation: `json`, `confusion` (PNG) and `scores` (npz)."""
    stem = Path(out) / f"{check_name(name)}_split{split}"
    return {
        "json": stem.with_name(f"{stem.name}.json"),
        "confusion": stem.with_name(f"{stem.name}_confusion.png"),
        "scores": stem.with_name(f"{stem.name}_scores.npz"),
    }


@dataclass
class VideoScores:
    """Per-video scores of one test list: ids, labels, class names and (N, K) scores per stream."""

    video_ids: list[str]
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    streams: dict[str, np.ndarray] = field(default_factory=dict)  # (N, K) float32, no softmax
    protocol: str = ""

    def fused(self) -> np.ndarray:
        """(N, K) video scores: every stream averaged before softmax (`fuse_arrays`)."""
        return fuse_arrays(self.streams)


def fuse_arrays(streams: dict[str, np.ndarray]) -> np.ndarray:
    """`st_resnet.fuse`, the one late fusion, on per-stream (N, K) numpy scores: (N, K)."""
    return fuse({k: torch.from_numpy(v) for k, v in streams.items()}).numpy()


def save_scores(path: str | Path, scores: VideoScores) -> Path:
    """Write `scores` as an npz of plain arrays (no object arrays, so no pickles), atomically."""
    arrays = {
        "video_ids": np.array(scores.video_ids, dtype=str),
        "labels": np.asarray(scores.labels, dtype=np.int64),
        "class_names": np.array(scores.class_names, dtype=str),
        "protocol": np.array(scores.protocol, dtype=str),
    }
    for stream, value in scores.streams.items():
        arrays[STREAM_PREFIX + stream] = np.asarray(value, dtype=np.float32)
    return write_atomic(path, lambda f: np.savez(f, **arrays))


def load_scores(path: str | Path) -> VideoScores:
    """Read a file of `save_scores` with `allow_pickle=False`; ConfigError (one line) if bad."""
    if not Path(path).is_file():
        raise ConfigError(f"scores '{path}' not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"cannot read scores '{path}': {first}") from None
    missing = [k for k in ("video_ids", "labels", "class_names") if k not in arrays]
    streams = {k[len(STREAM_PREFIX) :]: v for k, v in arrays.items() if k.startswith(STREAM_PREFIX)}
    if missing or not streams:
        what = missing[0] if missing else "scores_<stream>"
        raise ConfigError(f"'{path}' is not a strnet scores file (no {what})")
    ids, names = [str(v) for v in arrays["video_ids"]], [str(c) for c in arrays["class_names"]]
    for stream, value in streams.items():
        if value.shape != (len(ids), len(names)):
            raise ConfigError(
                f"'{path}': scores_{stream} has shape {value.shape}, "
                f"not ({len(ids)}, {len(names)}) videos x classes"
            )
    protocol = str(arrays["protocol"]) if "protocol" in arrays else ""
    labels = arrays["labels"].astype(np.int64)
    return VideoScores(ids, labels, names, {k: v.astype(np.float32) for k, v in streams.items()},
                       protocol)  # fmt: skip


def combine(sources: list[tuple[str, str, VideoScores]]) -> VideoScores:
    """Join the streams of several (name, where, scores) on the same videos, for fusion.

    Video ids, labels and class names must match the first source's (else a one-line error
    naming `where`). A stream name held by two sources becomes `<name>.<stream>` in each.
    """
    first_where, first = sources[0][1], sources[0][2]
    counts: dict[str, int] = {}
    for _, _, s in sources:
        for stream in s.streams:
            counts[stream] = counts.get(stream, 0) + 1
    names = [n for n, _, _ in sources]
    streams: dict[str, np.ndarray] = {}
    for i, (name, where, s) in enumerate(sources):
        for what, mine, theirs in (
            ("video ids", s.video_ids, first.video_ids),
            ("labels", s.labels.tolist(), first.labels.tolist()),
            ("class names", s.class_names, first.class_names),
        ):
            if mine != theirs:
                raise ConfigError(f"'{where}': {what} differ from those of '{first_where}'")
        prefix = name if names.count(name) == 1 else f"{i + 1}-{name}"
        for stream, value in s.streams.items():
            streams[f"{prefix}.{stream}" if counts[stream] > 1 else stream] = value
    protocols = sorted({s.protocol for _, _, s in sources if s.protocol})
    return VideoScores(first.video_ids, first.labels, first.class_names, streams,
                       "+".join(protocols))  # fmt: skip
