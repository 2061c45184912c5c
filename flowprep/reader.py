"""Random access to any frame or flow field of any extracted video: the trainer's one entry point.

`open_reader(path)` reads a frame-folder root written by `flowprep extract` (videos found by
their `.done` marker) or a shard directory written by `flowprep pack` (found by its index.json);
indices are 0-based, and flow k (frame k -> k+1) pairs with frame k. HDF5 files are opened
lazily per process, so a reader made before DataLoader workers fork is safe in each of them.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from flowprep.extract import MARKER, META, PARTIAL_DIR, frame_name

SHARD_INDEX = "index.json"  # flowprep.shards.INDEX


class ReaderError(Exception):
    """An unreadable frame or a bad request; str() names the video, the file and the cause."""


try:  # libjpeg-turbo straight to RGB, the fastest of PIL, cv2, simplejpeg (BENCHMARKS.md)
    import simplejpeg
except ImportError:  # pragma: no cover - the fallback when the wheel is absent
    simplejpeg = None


def decode_jpeg(data: bytes | np.ndarray, *, gray: bool, where: str) -> np.ndarray:
    """Decode JPEG bytes to (H, W) uint8 if `gray`, else (H, W, 3) RGB; ReaderError if corrupt.

    simplejpeg runs strict (a libjpeg warning such as "Corrupt JPEG data: ..." is an error); the
    cv2 fallback is made just as strict by `_cv2_decode`, so what is corrupt does not depend on
    which decoder is installed.
    """
    if simplejpeg is not None:
        try:
            image = simplejpeg.decode_jpeg(
                data.tobytes() if isinstance(data, np.ndarray) else data,
                colorspace="GRAY" if gray else "RGB",
            )
        except ValueError as exc:
            raise ReaderError(f"{where}: not a decodable JPEG ({exc})") from None
        return image[..., 0] if gray else image
    buf = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data
    if buf.size == 0:
        raise ReaderError(f"{where}: not a decodable JPEG (empty)")
    image, warning = _cv2_decode(buf, gray=gray)
    if image is None or warning:
        cause = warning or (
            "no JPEG start marker"
            if bytes(buf[:2]) != b"\xff\xd8"
            else "Premature end of JPEG file"
            if bytes(buf[-2:]) != b"\xff\xd9"
            else "cv2.imdecode found no image"
        )
        raise ReaderError(f"{where}: not a decodable JPEG ({cause})")
    return image if gray else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


_capture_lock = threading.Lock()
_capture: dict[int, int] = {}  # pid -> fd of this process's capture file (never shared by fork)


def _after_fork_in_child() -> None:  # a lock held by another thread at fork time stays held
    global _capture_lock
    _capture_lock = threading.Lock()
    _capture.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _cv2_decode(buf: np.ndarray, *, gray: bool) -> tuple[np.ndarray | None, str]:
    """cv2.imdecode and the first warning libjpeg or OpenCV printed while decoding ("" if none).

    cv2 decodes corrupt entropy data with only a warning on C stderr, so fd 2 is pointed at a
    private file for the call. Decoding is serialised per process in this fallback; text another
    thread writes to stderr in that window would count as a warning (a false alarm, never a miss).
    """
    with _capture_lock:
        pid = os.getpid()
        if pid not in _capture:
            _capture.clear()
            _capture[pid] = _private_file()
        fd = _capture[pid]
        saved = os.dup(2)
        os.dup2(fd, 2)
        try:
            image = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
            error = ""
        except cv2.error as exc:
            image, error = None, str(exc).strip().splitlines()[-1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        size = os.lseek(fd, 0, os.SEEK_CUR)
        text = os.pread(fd, min(size, 4096), 0).decode("utf-8", "replace") if size else ""
        if size:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return image, (lines[0] if lines else error)


def _private_file() -> int:
    """A file descriptor of an anonymous read-write file (memfd on Linux, else a temp file)."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("flowprep-jpeg-warnings")
    fd, name = tempfile.mkstemp(prefix="flowprep-jpeg-warnings-")
    os.unlink(name)
    return fd


class FolderVideo:
    """One extracted video folder: `rgb(indices)` (N, H, W, 3) and `flow(indices)` (N, H, W, 2)."""

    def __init__(self, folder: Path, video_id: str):
        self.folder, self.video_id = folder, video_id
        try:
            self.meta: dict = json.loads((folder / META).read_text())
        except (OSError, ValueError) as exc:
            cause = exc.strerror if isinstance(exc, OSError) else f"not JSON: {exc}"
            raise ReaderError(f"{folder / META}: unreadable metadata ({cause})") from None
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
            data = path.read_bytes()
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


class ShardVideo:
    """One video inside an HDF5 shard: the same `rgb`/`flow` API as FolderVideo."""

    _check = FolderVideo._check

    def __init__(self, reader: ShardReader, video_id: str):
        self.reader, self.video_id = reader, video_id
        self.where = f"{reader.root / reader.shard_of[video_id]}:{video_id}"
        group = self._group()
        try:
            self.meta: dict = json.loads(group.attrs["meta_json"])
            self.num_frames: int = int(self.meta["num_frames"])
            self.num_flows: int = int(self.meta.get("num_flows") or 0)
        except (KeyError, OSError, ValueError, TypeError) as exc:
            raise ReaderError(f"{self.where}: unreadable metadata ({_one_line(exc)})") from None
        self.label_index: int | None = self.meta.get("label_index")
        self._datasets: dict = {}

    def _group(self):
        return self.reader.group(self.video_id)

    def _dataset(self, kind: str) -> tuple:
        """(bytes dataset, offsets) of `kind`; offsets checked once, so a corrupt shard never
        makes a read ask for more bytes than the dataset holds."""
        if kind not in self._datasets:  # h5py path lookups cost ~100 us; keep the handles
            group = self._group()
            data, offsets = group[kind], np.asarray(group[kind + "_offsets"][:], np.int64)
            if (
                data.ndim != 1
                or offsets.ndim != 1
                or offsets.size == 0
                or offsets[0] != 0
                or offsets[-1] != data.shape[0]
                or np.any(np.diff(offsets) < 0)
            ):
                raise ValueError(f"{kind} offsets do not fit its {data.shape} bytes")
            self._datasets[kind] = (data, offsets)
        return self._datasets[kind]

    def crc32(self, kind: str) -> tuple[int | None, int]:
        """(CRC32 stored when packed or None, CRC32 of the bytes now) of `kind`'s dataset."""
        try:
            data = self._dataset(kind)[0]
            stored = data.attrs.get("crc32")
            return (None if stored is None else int(stored)), zlib.crc32(data[:].tobytes())
        except (KeyError, OSError, ValueError) as exc:
            raise ReaderError(f"{self.where}: unreadable {kind} ({_one_line(exc)})") from None

    def attribute_drift(self) -> list[tuple[str, object, object]]:
        """(key, meta_json's value, attribute's value) for each per-key attribute that differs.

        The group repeats meta_json's keys as plain attributes (for HDF5 browsers); None is
        stored as '' and dicts/lists as sorted JSON text.
        """
        drift = []
        try:
            attrs = dict(self._group().attrs)
        except (OSError, ValueError) as exc:
            raise ReaderError(f"{self.where}: unreadable attributes ({_one_line(exc)})") from None
        for key, want in self.meta.items():
            if want is None:
                want = ""
            elif isinstance(want, dict | list):
                want = json.dumps(want, sort_keys=True)
            value = attrs.get(key)
            value = value.item() if isinstance(value, np.generic) else value
            if value != want:
                drift.append((key, want, value))
        return drift

    def count(self, kind: str) -> int:
        """How many JPEGs of `kind` the shard holds (what meta's counts must agree with)."""
        try:
            return len(self._dataset(kind)[1]) - 1
        except (KeyError, OSError, ValueError) as exc:
            raise ReaderError(f"{self.where}: unreadable {kind} ({_one_line(exc)})") from None

    def raw(self, kind: str, index: int) -> bytes:
        """The stored JPEG bytes of `kind` ('img', 'flow_x', 'flow_y') at 0-based `index`."""
        return self.raw_many(kind, [index])[0]

    def raw_many(self, kind: str, indices: Sequence[int]) -> list[bytes]:
        """Stored JPEG bytes at `indices`; a consecutive run is one HDF5 read (flow stacks)."""
        picked = [int(i) for i in indices]
        try:
            data, offsets = self._dataset(kind)
            bad = [i for i in picked if not 0 <= i < len(offsets) - 1]
            if bad:
                raise IndexError(f"index {bad[0]} out of range 0..{len(offsets) - 2}")
            if picked and picked == list(range(picked[0], picked[0] + len(picked))):
                start = int(offsets[picked[0]])
                run = data[start : int(offsets[picked[-1] + 1])].tobytes()
                return [run[offsets[i] - start : offsets[i + 1] - start] for i in picked]
            return [data[int(offsets[i]) : int(offsets[i + 1])].tobytes() for i in picked]
        except (KeyError, OSError, ValueError, IndexError) as exc:
            raise ReaderError(
                f"{self.where}: cannot read {kind}{picked} ({_one_line(exc)})"
            ) from None

    def _decode(self, kind: str, picked: list[int], *, gray: bool) -> list[np.ndarray]:
        blobs = self.raw_many(kind, picked)
        where = f"{self.where}:{kind}"
        return [
            decode_jpeg(b, gray=gray, where=f"{where}[{i}]")
            for b, i in zip(blobs, picked, strict=True)
        ]

    def rgb(self, indices: Sequence[int]) -> np.ndarray:
        """RGB frames at 0-based `indices` as uint8 (N, H, W, 3)."""
        picked = self._check(indices, self.num_frames, "frame")
        return np.stack(self._decode("img", picked, gray=False))

    def flow(self, indices: Sequence[int]) -> np.ndarray:
        """Quantized flow k (frame k -> k+1) at 0-based `indices` as uint8 (N, H, W, 2): x, y."""
        picked = self._check(indices, self.num_flows, "flow")
        xs, ys = (self._decode(k, picked, gray=True) for k in ("flow_x", "flow_y"))
        return np.stack([np.stack(xs), np.stack(ys)], axis=-1)


class ShardReader:
    """Every video in a shard directory (index.json + shard_*.h5), by video id."""

    def __init__(self, root: Path):
        self.root = Path(root)
        try:
            self.shard_of: dict[str, str] = dict(
                json.loads((self.root / SHARD_INDEX).read_text())["videos"]
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ReaderError(
                f"{self.root / SHARD_INDEX}: unreadable shard index ({exc})"
            ) from None
        self.video_ids: list[str] = sorted(self.shard_of)
        self._files: dict = {}
        self._videos: dict[str, ShardVideo] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.video_ids)

    def __contains__(self, video_id: object) -> bool:
        return video_id in self.shard_of

    def __getitem__(self, video_id: str) -> ShardVideo:
        if video_id not in self.shard_of:
            raise KeyError(f"{self.root}: no packed video {video_id!r}")
        self._same_process()
        if video_id not in self._videos:
            self._videos[video_id] = ShardVideo(self, video_id)
        return self._videos[video_id]

    def __getstate__(self) -> dict:  # h5py handles never cross a pickle
        return {**self.__dict__, "_files": {}, "_videos": {}}

    def _same_process(self) -> None:
        if self._pid != os.getpid():  # forked (DataLoader worker): drop the parent's handles
            self._files, self._videos, self._pid = {}, {}, os.getpid()

    def group(self, video_id: str):
        """The open HDF5 group of `video_id`, opening its shard in this process if needed."""
        import h5py

        self._same_process()
        name = self.shard_of[video_id]
        if name not in self._files:
            try:
                self._files[name] = h5py.File(self.root / name, "r")
            except OSError as exc:
                raise ReaderError(
                    f"{self.root / name}: cannot open shard ({_one_line(exc)})"
                ) from None
        try:
            return self._files[name]["videos"][video_id]
        except (KeyError, OSError, ValueError) as exc:
            raise ReaderError(
                f"{self.root / name}: no readable group {video_id!r} ({_one_line(exc)})"
            ) from None

    def close(self) -> None:
        """Close this process's open shard files."""
        for f in self._files.values():
            f.close()
        self._files, self._videos = {}, {}


def _one_line(exc: BaseException) -> str:
    """An exception's text on one line (h5py's can span several)."""
    return " ".join(str(exc).split()).strip("'\"")


def open_reader(path: Path) -> FolderReader | ShardReader:
    """Open a frame-folder root (`flowprep extract`) or a shard directory (`flowprep pack`)."""
    path = Path(path)
    if not path.is_dir():
        raise ReaderError(f"{path}: not a directory of extracted videos or shards")
    if (path / SHARD_INDEX).is_file():
        return ShardReader(path)
    return FolderReader(path)
