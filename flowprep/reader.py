"""Random access to any frame or flow field of any extracted video: the trainer's one entry point.

`open_reader(path)` reads a frame-folder root written by `flowprep extract` (videos found by
their `.done` marker); indices are 0-based, and flow k (frame k -> k+1) pairs with frame k.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from flowprep.extract import MARKER, META, PARTIAL_DIR, frame_name


class ReaderError(Exception):
    """An unreadable frame or a bad request; str() names the video, the file and the cause."""


def decode_jpeg(data: bytes | np.ndarray, *, gray: bool, where: str) -> np.ndarray:
    """Decode JPEG bytes to (H, W) uint8 if `gray`, else (H, W, 3) RGB; ReaderError if corrupt."""
    buf = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data
    image = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
    if image is None:
        raise ReaderError(f"{where}: not a decodable JPEG")
    return image if gray else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class FolderVideo:
    """One extracted video folder: `rgb(indices)` (N, H, W, 3) and `flow(indices)` (N, H, W, 2)."""

    def __init__(self, folder: Path, video_id: str):
        self.folder, self.video_id = folder, video_id
        self.meta: dict = json.loads((folder / META).read_text())
        self.num_frames: int = int(self.meta["num_frames"])
        self.num_flows: int = int(self.meta.get("num_flows") or 0)
        self.label_index: int | None = self.meta.get("label_index")

    def _check(self, indices: Sequence[int], count: int, kind: str) -> list[int]:
        picked = [int(i) for i in indices]
        bad = [i for i in picked if not 0 <= i < count]
        if bad:
            raise ReaderError(f"{self.video_id}: {kind} index {bad[0]} out of range 0..{count - 1}")
        return picked

    def _read(self, name: str, *, gray: bool) -> np.ndarray:
        path = self.folder / name
        try:
            data = np.fromfile(path, np.uint8)
        except OSError as exc:
            raise ReaderError(f"{path}: cannot read ({exc.strerror})") from None
        return decode_jpeg(data, gray=gray, where=str(path))

    def rgb(self, indices: Sequence[int]) -> np.ndarray:
        """RGB frames at 0-based `indices` as uint8 (N, H, W, 3)."""
        picked = self._check(indices, self.num_frames, "frame")
        return np.stack([self._read(frame_name("img", i), gray=False) for i in picked])

    def flow(self, indices: Sequence[int]) -> np.ndarray:
        """Quantized flow k (frame k -> k+1) at 0-based `indices` as uint8 (N, H, W, 2): x, y."""
        picked = self._check(indices, self.num_flows, "flow")
        return np.stack(
            [
                np.stack(
                    [self._read(frame_name(kind, i), gray=True) for kind in ("flow_x", "flow_y")],
                    axis=-1,
                )
                for i in picked
            ]
        )


class FolderReader:
    """Every finished video under a frame-folder root, by video id (ids may contain '/')."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.video_ids: list[str] = sorted(_finished_videos(self.root))
        self._known = set(self.video_ids)

    def __len__(self) -> int:
        return len(self.video_ids)

    def __contains__(self, video_id: object) -> bool:
        return video_id in self._known

    def __getitem__(self, video_id: str) -> FolderVideo:
        if video_id not in self._known:
            raise KeyError(f"{self.root}: no finished video {video_id!r}")
        return FolderVideo(self.root / video_id, video_id)


def _finished_videos(root: Path) -> list[str]:
    found = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != PARTIAL_DIR]
        if MARKER in files and META in files:
            found.append(Path(dirpath).relative_to(root).as_posix())
            dirs[:] = []  # a video folder holds frames, not more videos
    return found


def open_reader(path: Path) -> FolderReader:
    """Open a frame-folder root written by `flowprep extract`."""
    path = Path(path)
    if not path.is_dir():
        raise ReaderError(f"{path}: not a directory of extracted videos")
    return FolderReader(path)
