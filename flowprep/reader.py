"""Random access to any frame or flow field of any extracted video: the trainer's one entry point.

`open_reader(path)` reads a frame-folder root written by `flowprep extract` (videos found by
their `.done` marker) or a shard directory written by `flowprep pack` (found by its index.json);
indices are 0-based, and flow k (frame k -> k+1) pairs with frame k. HDF5 files are opened
lazily per process, so a reader made before DataLoader workers fork is safe in each of them.

Every frame read is checked against the CRC32 written with it (meta.json's `file_crc32` for a
frame folder, `<kind>_crc32` in a shard), so a flipped bit is an error naming the video and the
frame, never changed pixels (`CHECK_CRC`; frame folders and shards from before the CRCs are read
unchecked). index.json is untrusted input too: it may only name shard_NNNNN.h5 files in its own
folder that are regular files, and a dataset must store the bytes it declares.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from flowprep.layout import (
    CHECKSUMS,
    CRC_SUFFIX,
    MARKER,
    META,
    PARTIAL_DIR,
    SHARD_INDEX,
    SHARD_NAME,
    frame_name,
)

CHECK_CRC = True  # compare each frame read with its CRC32 (benchmarks/reader.py times both)
MAX_FRAME_BYTES = 64 * 2**20  # a stored JPEG larger than this is a corrupt offset, not a frame
READ_CHUNK = 16 * 2**20  # whole-dataset CRCs (verify) read this many bytes at a time


class ReaderError(Exception):
    """An unreadable frame or a bad request; str() names the video, the file and the cause."""


def crc_mismatch(data: bytes, want: int | None, source: str) -> str | None:
    """Why `data` is not the bytes whose CRC32 `source` recorded as `want` (None: no record)."""
    if want is None or not CHECK_CRC:
        return None
    actual = zlib.crc32(data)
    if actual == want:
        return None
    return f"CRC32 {actual:08x}, {source} {want:08x} (bytes changed)"


def file_checksums(meta: dict, where: str) -> dict[str, int]:
    """meta.json's {frame file: CRC32} (empty for folders extracted before it was written)."""
    sums = meta.get(CHECKSUMS)
    if sums is None:
        return {}
    if not isinstance(sums, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in sums.items()
    ):
        raise ReaderError(f"{where}: {CHECKSUMS} is not a {{file name: CRC32}} object")
    return sums


def shard_file_problem(root: Path, name: object) -> str | None:
    """Why index.json's shard `name` cannot be opened in `root`, or None (checked, not opened).

    A name must be a shard_NNNNN.h5 file name (no folder, so it cannot leave `root`), and the
    file a regular one: a FIFO would hang the reader and a device feed it without end. A
    symlink is followed only to a regular file inside `root`.
    """
    if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
        return f"shard {name!r} is not a shard_NNNNN.h5 file name in this folder"
    path = Path(root) / name
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            target = Path(os.path.realpath(path))
            if target.parent != Path(os.path.realpath(root)):
                return f"shard {name} is a symlink to {target}, outside {root}"
            st = os.stat(target)
    except OSError as exc:
        return f"shard {name}: cannot open ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return f"shard {name} is not a regular file but {_file_kind(st.st_mode)}"
    return None


def _file_kind(mode: int) -> str:
    kinds = [
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((text for test, text in kinds if test(mode)), f"mode {stat.filemode(mode)}")


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
        self.checksums = file_checksums(self.meta, str(folder / META))

    def _check(self, indices: Sequence[int], count: int, kind: str) -> list[int]:
        picked = [int(i) for i in indices]
        bad = [i for i in picked if not 0 <= i < count]
        if bad:
            raise ReaderError(f"{self.video_id}: {kind} index {bad[0]} out of range 0..{count - 1}")
        return picked

    def raw(self, name: str) -> bytes:
        """The bytes of frame file `name`, checked against meta.json's CRC32 of it."""
        path = self.folder / name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ReaderError(f"{path}: cannot read ({exc.strerror})") from None
        problem = crc_mismatch(data, self.checksums.get(name), f"{META} says")
        if problem:
            raise ReaderError(f"{path}: {problem}")
        return data

    def _read(self, name: str, *, gray: bool) -> np.ndarray:
        return decode_jpeg(self.raw(name), gray=gray, where=str(self.folder / name))

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

    def _stored(self, dataset, name: str):
        """`dataset` if the shard really stores the bytes it declares, else ValueError.

        flowprep writes datasets uncompressed, so storage below the declared size means a
        compressed or never-written dataset: a few kB that would read as gigabytes.
        """
        declared, stored = dataset.nbytes, dataset.id.get_storage_size()
        size = self.reader.file_size(self.reader.shard_of[self.video_id])
        if stored < declared or declared > size:
            raise ValueError(
                f"{name} declares {declared} bytes but the shard stores {stored} of them "
                f"({size} bytes in the file)"
            )
        return dataset

    def _dataset(self, kind: str) -> tuple:
        """(bytes dataset, offsets, per-JPEG CRC32s or None) of `kind`; checked once, so a
        corrupt shard never makes a read ask for more bytes than the dataset holds."""
        if kind not in self._datasets:  # h5py path lookups cost ~100 us; keep the handles
            group = self._group()
            data = self._stored(group[kind], kind)
            offsets = np.asarray(self._stored(group[kind + "_offsets"], kind)[:], np.int64)
            crcs = group.get(kind + CRC_SUFFIX)
            if crcs is not None:
                crcs = np.asarray(self._stored(crcs, kind + CRC_SUFFIX)[:], np.int64)
            if (
                data.ndim != 1
                or offsets.ndim != 1
                or offsets.size == 0
                or offsets[0] != 0
                or offsets[-1] != data.shape[0]
                or np.any(np.diff(offsets) < 0)
            ):
                raise ValueError(f"{kind} offsets do not fit its {data.shape} bytes")
            if np.any(np.diff(offsets) > MAX_FRAME_BYTES):
                big = int(np.argmax(np.diff(offsets)))
                raise ValueError(
                    f"{kind}[{big}] would be {int(offsets[big + 1] - offsets[big])} bytes, over "
                    f"the {MAX_FRAME_BYTES} a frame may have"
                )
            if crcs is not None and crcs.shape != (offsets.size - 1,):
                raise ValueError(f"{kind}{CRC_SUFFIX} has {crcs.shape}, not one CRC per JPEG")
            self._datasets[kind] = (data, offsets, crcs)
        return self._datasets[kind]

    def crc32(self, kind: str) -> tuple[int | None, int]:
        """(CRC32 stored when packed or None, CRC32 of the bytes now) of `kind`'s dataset.

        Read READ_CHUNK bytes at a time: checking a shard needs no more memory than that.
        """
        try:
            data = self._dataset(kind)[0]
            stored = data.attrs.get("crc32")
            crc = 0
            for start in range(0, data.shape[0], READ_CHUNK):
                crc = zlib.crc32(data[start : start + READ_CHUNK].tobytes(), crc)
            return (None if stored is None else int(stored)), crc
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

    def raw(self, kind: str, index: int, *, check: bool = True) -> bytes:
        """The stored JPEG bytes of `kind` ('img', 'flow_x', 'flow_y') at 0-based `index`."""
        return self.raw_many(kind, [index], check=check)[0]

    def packed_crc(self, kind: str, index: int) -> int | None:
        """The CRC32 packed with JPEG `index` of `kind` (None: packed before per-JPEG CRCs)."""
        crcs = self._dataset(kind)[2]
        return None if crcs is None else int(crcs[index])

    def raw_many(self, kind: str, indices: Sequence[int], *, check: bool = True) -> list[bytes]:
        """Stored JPEG bytes at `indices`, each checked against its packed CRC32 unless not
        `check`; a consecutive run is one HDF5 read (flow stacks)."""
        picked = [int(i) for i in indices]
        try:
            data, offsets, crcs = self._dataset(kind)
            bad = [i for i in picked if not 0 <= i < len(offsets) - 1]
            if bad:
                raise IndexError(f"index {bad[0]} out of range 0..{len(offsets) - 2}")
            if picked and picked == list(range(picked[0], picked[0] + len(picked))):
                start = int(offsets[picked[0]])
                run = data[start : int(offsets[picked[-1] + 1])].tobytes()
                blobs = [run[offsets[i] - start : offsets[i + 1] - start] for i in picked]
            else:
                blobs = [data[int(offsets[i]) : int(offsets[i + 1])].tobytes() for i in picked]
        except (KeyError, OSError, ValueError, IndexError) as exc:
            raise ReaderError(
                f"{self.where}: cannot read {kind}{picked} ({_one_line(exc)})"
            ) from None
        if check and crcs is not None:
            for i, blob in zip(picked, blobs, strict=True):
                problem = crc_mismatch(blob, int(crcs[i]), "packed as")
                if problem:
                    raise ReaderError(f"{self.where}:{kind}[{i}]: {problem}")
        return blobs

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
        first_user = {}  # each shard file checked once, named with the first video in it
        for video_id in sorted(self.shard_of, key=str):
            first_user.setdefault(str(self.shard_of[video_id]), video_id)
        for _, video_id in sorted(first_user.items()):
            problem = shard_file_problem(self.root, self.shard_of[video_id])
            if problem:
                raise ReaderError(f"{self.root / SHARD_INDEX}: video {video_id!r}: {problem}")
        self.video_ids: list[str] = sorted(self.shard_of)
        self._files: dict = {}
        self._sizes: dict[str, int] = {}
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
        return {**self.__dict__, "_files": {}, "_videos": {}, "_sizes": {}}

    def _same_process(self) -> None:
        if self._pid != os.getpid():  # forked (DataLoader worker): drop the parent's handles
            self._files, self._videos, self._sizes = {}, {}, {}
            self._pid = os.getpid()

    def file_size(self, name: str) -> int:
        """Bytes in shard file `name` when this process opened it."""
        return self._sizes[name]

    def group(self, video_id: str):
        """The open HDF5 group of `video_id`, opening its shard in this process if needed."""
        import h5py

        self._same_process()
        name = self.shard_of[video_id]
        if name not in self._files:
            problem = shard_file_problem(self.root, name)  # checked again: it may have changed
            if problem:
                raise ReaderError(f"{self.root / SHARD_INDEX}: video {video_id!r}: {problem}")
            try:
                self._files[name] = h5py.File(self.root / name, "r")
                self._sizes[name] = os.stat(self.root / name).st_size
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
