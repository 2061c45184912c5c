"""HDF5 shards: each video's JPEG bytes (RGB, flow_x, flow_y) as they are, plus an index file.

Small-file I/O dominates reading ~7.5 M frame JPEGs; packing them into a few large HDF5 files
(no re-encoding) keeps random access cheap and copies cheap. Variable-length records are stored
as one contiguous uint8 dataset per kind plus `<kind>_offsets` (N + 1 int64), Arrow-style: a
slice read costs ~6 us, where h5py's vlen type costs ~40 us per record (measured). Each bytes
dataset carries the CRC32 of its bytes, so `verify` finds any changed byte, not only the
changes that make a JPEG undecodable, and `<kind>_crc32` holds the CRC32 of each JPEG, which the
reader checks for every frame it returns. Packing checks each file against the CRC32 its
meta.json recorded at extract time, so a frame changed on disk is refused, not packed.

Videos go into shards in video-id order, a shard closing before the video that would take it
past the size limit, so the layout depends only on the corpus. A shard is written as
`shard_NNNNN.h5.tmp`, fsynced and renamed when complete; `index.json` (video -> shard, and the
video's completion stamp) is rewritten atomically after each shard, so a killed `pack` or
`extract --format hdf5` resumes at the first unfinished shard and ends byte-identical to an
uninterrupted run. A video whose stamp changed (re-extracted) is packed again into a new shard;
its old copy stays in the old shard, unreferenced, until a shard holds no referenced video: then
the run deletes it as it ends, so every shard file is one that index.json names (`verify`
checks this). A run holds a flock on the shard directory, so a second run writing there at the
same time stops with a one-line error.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from flowprep.atomic import lock_directory, write_json_atomic
from flowprep.layout import (
    CHECKSUMS,
    CRC_SUFFIX,
    FRAME_KINDS,
    MARKER,
    META,
    SHARD_INDEX,
    SHARD_NAME,
    frame_name,
    read_lists,
    shard_name,
    write_lists,
)
from flowprep.reader import FolderReader, ReaderError, crc_mismatch, file_checksums

INDEX = SHARD_INDEX
SHARD_FORMAT = "flowprep-shards-1"
KINDS = FRAME_KINDS
OFFSETS = "_offsets"  # JPEG i of kind k is k[k_offsets[i] : k_offsets[i + 1]]
# CRC_SUFFIX: k_crc32[i] is zlib.crc32 of JPEG i of kind k (flowprep.reader checks it)
CRC = "crc32"  # attribute of each bytes dataset: zlib.crc32 of all its bytes, for `verify`
WORK_DIR = ".frames"  # extract --format hdf5: finished frame folders waiting for their shard
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


class ShardError(Exception):
    """A video or shard that cannot be packed; str() is one line naming the file and the cause."""


def parse_size(text: str) -> int:
    """Bytes in a size such as '4GB', '500MB', '1024'; ValueError with the text if unparsable."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 4GB, 500MB)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def read_index(shards_dir: Path) -> dict:
    """The shard directory's index; a missing index is an empty one, an unreadable one ShardError.

    {"format": SHARD_FORMAT, "videos": {id: shard file name}, "stamps": {id: the video's `.done`
    marker when packed}, "num_frames": {id: frame count}}; the reader needs only "videos".
    """
    path = Path(shards_dir) / INDEX
    if not path.is_file():
        return {"format": SHARD_FORMAT, "videos": {}, "stamps": {}, "num_frames": {}}
    try:
        index = json.loads(path.read_text())
        if index.get("format") != SHARD_FORMAT:
            raise ValueError(f"format {index.get('format')!r}, expected {SHARD_FORMAT!r}")
        for key in ("videos", "stamps", "num_frames"):
            index[key] = dict(index.get(key) or {})
        for video_id, name in index["videos"].items():
            if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
                raise ValueError(f"video {video_id!r} names {name!r}, not a shard_NNNNN.h5 file")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ShardError(f"{path}: unreadable shard index ({exc})") from None
    return index


def _attr(value: object) -> object:
    """meta.json values as HDF5 attributes: None -> '', dicts -> JSON text."""
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return value


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        cause = exc.strerror if isinstance(exc, OSError) else f"not JSON: {exc}"
        raise ShardError(f"{path}: cannot read ({cause})") from None


def stamp_of(folder: Path) -> dict:
    """A finished video folder's completion stamp (its `.done` marker: settings and source)."""
    return _read_json(Path(folder) / MARKER)


def pack_video(folder: Path, video_id: str, shard: h5py.File) -> int:
    """Copy one finished video folder's JPEG bytes and meta.json into an open shard.

    Returns the video's frame count; ShardError (one line, naming the file) if it is incomplete
    or a file's bytes differ from the CRC32 meta.json recorded. The per-file CRCs become the
    `<kind>_crc32` datasets, not part of the stored meta (an HDF5 attribute holds 64 kB at most).
    """
    folder = Path(folder)
    meta = _read_json(folder / META)
    if meta.get("flow_format") == "npy" and meta.get("num_flows"):
        raise ShardError(f"{folder}: flow stored as .npy; shards hold JPEG frames only")
    try:
        checksums = file_checksums(meta, str(folder / META))
    except ReaderError as exc:
        raise ShardError(str(exc)) from None
    meta.pop(CHECKSUMS, None)
    group = shard.require_group("videos").create_group(video_id)
    group.attrs["meta_json"] = json.dumps(meta, sort_keys=True)
    for key, value in meta.items():
        group.attrs[key] = _attr(value)
    counts = {"img": int(meta["num_frames"]), "flow_x": int(meta.get("num_flows") or 0)}
    counts["flow_y"] = counts["flow_x"]
    for kind in KINDS:
        blobs = []
        crcs = []
        for i in range(counts[kind]):
            path = folder / frame_name(kind, i)
            try:
                blobs.append(np.fromfile(path, np.uint8))
            except OSError as exc:
                raise ShardError(f"{path}: cannot read ({exc.strerror})") from None
            problem = crc_mismatch(blobs[-1], checksums.get(path.name), f"{META} says")
            if problem:
                raise ShardError(f"{path}: {problem}; not packed")
            crcs.append(zlib.crc32(blobs[-1]))
        offsets = np.cumsum([0] + [b.size for b in blobs], dtype=np.int64)
        data = np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)
        group.create_dataset(kind, data=data).attrs[CRC] = zlib.crc32(data)
        group.create_dataset(kind + OFFSETS, data=offsets)
        group.create_dataset(kind + CRC_SUFFIX, data=np.asarray(crcs, np.uint32))
    return counts["img"]


def _video_bytes(folder: Path) -> int:
    return sum(e.stat().st_size for e in os.scandir(folder) if e.name.endswith(".jpg"))


def _lock_directory(path: Path) -> int:
    """flock the directory itself, so two runs never write shards into it at once."""
    fd = lock_directory(path)
    if fd is None:
        raise ShardError(f"{path}: another flowprep run is writing shards here")
    return fd


class ShardWriter:
    """Packs finished videos into shards in the order given, as soon as each shard's set is known.

    `add(video_id, ok)` marks a video resolved (ok: its folder is finished and must be packed).
    A shard is written once the first video that does not fit in it is known, so the shards are
    the same whatever order videos finish in. `close()` writes the last shard.
    """

    def __init__(
        self,
        frames_dir: Path,
        shards_dir: Path,
        order: list[str],
        shard_size: int,
        *,
        on_packed: Callable[[list[str]], None] | None = None,
    ):
        self.frames_dir, self.shards_dir = Path(frames_dir), Path(shards_dir)
        self.order, self.shard_size, self.on_packed = list(order), shard_size, on_packed
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_directory(self.shards_dir)  # before anything here is touched
        self.index = read_index(self.shards_dir)
        for stale in self.shards_dir.glob("*.h5.tmp"):
            stale.unlink()  # an interrupted shard: its videos are not in the index, redo them
        used = [re.fullmatch(r"shard_(\d+)\.h5", name) for name in self.index["videos"].values()]
        self.number = max((int(m.group(1)) for m in used if m), default=-1) + 1
        # (a shard renamed but not yet indexed when a run was killed gets this number again)
        self.resolved: dict[str, bool] = {}
        self.position = 0  # order[:position] is resolved and grouped
        self.group: list[str] = []
        self.group_bytes = 0

    def add(self, video_id: str, ok: bool) -> None:
        self.resolved[video_id] = ok
        while self.position < len(self.order) and self.order[self.position] in self.resolved:
            vid = self.order[self.position]
            if self.resolved[vid]:
                size = _video_bytes(self.frames_dir / vid)
                if self.group and self.group_bytes + size > self.shard_size:
                    self._write_group()
                self.group.append(vid)
                self.group_bytes += size
            self.position += 1

    def close(self) -> dict:
        """Write the last shard; return the index (also written when nothing was packed)."""
        try:
            if self.group:
                self._write_group()
            if not (self.shards_dir / INDEX).exists():
                write_json_atomic(self.shards_dir / INDEX, self.index)
            self._drop_unreferenced()
        finally:
            self.release()
        return self.index

    def release(self) -> None:
        """Let another run write shards here (close() does it; call it after an error)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _drop_unreferenced(self) -> None:
        """Delete shard files the (already written) index no longer names: nothing reads them."""
        used = set(self.index["videos"].values())
        for path in sorted(self.shards_dir.iterdir()):
            if SHARD_NAME.fullmatch(path.name) and path.name not in used:
                path.unlink()

    def _write_group(self) -> None:
        name = shard_name(self.number)
        tmp = self.shards_dir / (name + ".tmp")
        frames = {}
        try:
            with h5py.File(tmp, "w") as shard:
                shard.attrs["format"] = SHARD_FORMAT
                for vid in self.group:
                    frames[vid] = pack_video(self.frames_dir / vid, vid, shard)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.shards_dir / name)
        except OSError as exc:  # disk full, permissions: h5py's text can span lines
            cause = " ".join(str(exc).split())
            raise ShardError(f"{tmp}: cannot write shard ({cause})") from None
        for vid in self.group:
            self.index["videos"][vid] = name
            self.index["stamps"][vid] = stamp_of(self.frames_dir / vid)
            self.index["num_frames"][vid] = frames[vid]
        write_json_atomic(self.shards_dir / INDEX, self.index)
        if self.on_packed is not None:
            self.on_packed(self.group)
        self.number += 1
        self.group, self.group_bytes = [], 0


def pack(
    frames_dir: Path,
    shards_dir: Path,
    *,
    shard_size: int = 4 * 10**9,
    on_start: Callable[[int], None] | None = None,
    on_packed: Callable[[list[str]], None] | None = None,
) -> dict:
    """Pack every finished video under `frames_dir` into HDF5 shards in `shards_dir`.

    The annotation lists (all.txt, <split>_split<N>.txt) are copied beside the shards, and
    lists there that `frames_dir` no longer has are deleted (a stale split would leak videos).
    Resumable: videos already packed with the same completion stamp are skipped; returns the
    index. `on_start(n)` is told how many videos are to be packed, `on_packed(ids)` the videos
    of each shard once it is written (progress bars).
    """
    frames_dir = Path(frames_dir)
    index = read_index(shards_dir)
    todo = [
        vid
        for vid in FolderReader(frames_dir).video_ids
        if vid not in index["videos"] or index["stamps"].get(vid) != stamp_of(frames_dir / vid)
    ]
    if on_start is not None:
        on_start(len(todo))
    writer = ShardWriter(frames_dir, shards_dir, todo, shard_size, on_packed=on_packed)
    try:
        for vid in todo:
            writer.add(vid, True)
        index = writer.close()
        write_lists(shards_dir, read_lists(frames_dir))  # the trainer finds them beside the shards
        return index
    finally:
        writer.release()
