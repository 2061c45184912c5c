"""Integrity checks for frame folders and HDF5 shards: counts, decodable JPEGs, manifest agreement.

A copied or interrupted corpus fails quietly at training time; `verify` reads everything once
and reports each problem in one line (the video, the file, the cause) instead of crashing on the
first bad file. A truncated or corrupted shard is one more problem, never a crash. Every frame
file is compared with the CRC32 meta.json recorded when it was extracted (folders), or with the
per-JPEG CRC32 packed with it (shards). Shards are read in bounded pieces: an index.json naming
anything but a regular shard file in its folder, or a dataset declaring more bytes than the
shard stores, is a problem, not a hang or gigabytes of memory.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowprep.layout import FRAME_KINDS, META, SHARD_GLOB, SHARD_INDEX, frame_glob, frame_name
from flowprep.manifest import ManifestError, VideoEntry, read_manifest
from flowprep.reader import (
    FolderReader,
    FolderVideo,
    ReaderError,
    ShardReader,
    ShardVideo,
    crc_mismatch,
    decode_jpeg,
    open_reader,
)

KINDS = FRAME_KINDS
SHARD_FILE = SHARD_GLOB


@dataclass(frozen=True)
class Problem:
    """One problem found: the video (or file) it concerns and what is wrong."""

    where: str  # video id, or a file path for problems outside any video
    message: str

    def __str__(self) -> str:
        return " ".join(f"{self.where}: {self.message}".split())  # always one line


def _counts(video: FolderVideo | ShardVideo) -> dict[str, int]:
    """JPEGs (or .npy flows) actually present per kind."""
    if isinstance(video, ShardVideo):
        return {k: video.count(k) for k in KINDS}
    found = {k: sum(1 for _ in video.folder.glob(frame_glob(k))) for k in (*KINDS, "flow")}
    return found


def _check_counts(vid: str, video: FolderVideo | ShardVideo) -> list[Problem]:
    found = _counts(video)
    npy = video.meta.get("flow_format") == "npy"
    want = {"img": video.num_frames}
    want.update({"flow": video.num_flows} if npy else dict.fromkeys(KINDS[1:], video.num_flows))
    problems = [
        Problem(vid, f"{found.get(kind, 0)} {kind} files, meta says {n}")
        for kind, n in want.items()
        if found.get(kind, 0) != n
    ]
    if video.num_flows and video.num_flows != video.num_frames - 1:
        problems.append(Problem(vid, f"{video.num_flows} flows for {video.num_frames} frames"))
    return problems


def _check_shard(vid: str, video: ShardVideo) -> list[Problem]:
    """Each bytes dataset still has the CRC32 it was packed with; attributes match meta_json."""
    shard = video.reader.shard_of[vid]
    problems = [
        Problem(vid, f"{shard}: attribute {key} is {value!r}, meta_json says {want!r}")
        for key, want, value in video.attribute_drift()
    ]
    for kind in KINDS:
        stored, actual = video.crc32(kind)
        if stored is not None and stored != actual:
            where = f"{shard}:{kind}"
            problems.append(
                Problem(vid, f"{where}: CRC32 {actual:08x}, packed as {stored:08x} (bytes changed)")
            )
    return problems


def _frames(video: FolderVideo | ShardVideo) -> list[tuple[str, int, bool]]:
    """(kind, 0-based index, grayscale) of every JPEG the video's meta promises."""
    jobs = [("img", i, False) for i in range(video.num_frames)]
    if video.meta.get("flow_format") != "npy":
        jobs += [(k, i, True) for k in KINDS[1:] for i in range(video.num_flows)]
    return jobs


def _check_images(vid: str, video: FolderVideo | ShardVideo) -> list[Problem]:
    """Every JPEG decodes, at the size meta states; every .npy flow loads as (H, W, 2)."""
    problems = []
    size = (video.meta.get("height"), video.meta.get("width"))
    for kind, i, gray in _frames(video):
        try:
            if isinstance(video, ShardVideo):
                where = f"{video.reader.shard_of[vid]}:{kind}[{i}]"
                data = video.raw(kind, i, check=False)
                problem = crc_mismatch(data, video.packed_crc(kind, i), "packed as")
                if problem:
                    raise ReaderError(f"{where}: {problem}")
            else:
                where = frame_name(kind, i)
                data = _read_file(video.folder / where)
                problem = crc_mismatch(data, video.checksums.get(where), f"{META} says")
                if problem:
                    raise ReaderError(f"{where}: {problem}")
            image = decode_jpeg(data, gray=gray, where=where)
            if None not in size and image.shape[:2] != size:
                h, w = image.shape[:2]
                problems.append(Problem(vid, f"{where}: {w}x{h}, meta says {size[1]}x{size[0]}"))
        except ReaderError as exc:
            problems.append(Problem(vid, str(exc)))
    if isinstance(video, FolderVideo) and video.meta.get("flow_format") == "npy":
        for i in range(video.num_flows):
            path = video.folder / frame_name("flow", i)
            try:
                data = path.read_bytes()
                problem = crc_mismatch(data, video.checksums.get(path.name), f"{META} says")
                if problem:
                    raise ValueError(problem)
                flow = np.load(io.BytesIO(data), allow_pickle=False)
                if flow.ndim != 3 or flow.shape[2] != 2:
                    raise ValueError(f"shape {flow.shape}, expected (H, W, 2)")
            except (OSError, ValueError, EOFError) as exc:
                problems.append(Problem(vid, f"{path.name}: unreadable flow ({exc})"))
    return problems


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ReaderError(f"{path.name}: cannot read ({exc.strerror})") from None


def _check_manifest(vid: str, meta: dict, entry: VideoEntry | None) -> list[Problem]:
    if entry is None:
        return [Problem(vid, "not in the manifest")]
    wanted = {"label": entry.label, "label_index": entry.label_index, "source": entry.path}
    return [
        Problem(vid, f"{key} {meta.get(key)!r}, manifest says {value!r}")
        for key, value in wanted.items()
        if key in meta and meta[key] != value
    ]


def _check_corpus(path: Path, reader: FolderReader | ShardReader) -> list[Problem]:
    """No videos at all, or shard files that no index.json names, are problems too.

    An empty folder, a folder of unextracted videos and shards without their index.json would
    otherwise "verify" with nothing checked.
    """
    used = set(reader.shard_of.values()) if isinstance(reader, ShardReader) else set()
    problems = [
        Problem(str(shard), f"shard file not referenced by {SHARD_INDEX}")
        for shard in sorted(Path(path).glob(SHARD_FILE))
        if shard.name not in used
    ]
    if not reader.video_ids:
        kind = "index.json lists" if isinstance(reader, ShardReader) else "finished video folders"
        problems.insert(0, Problem(str(path), f"no videos found (0 {kind})"))
    return problems


def verify(
    path: Path,
    manifest: Path | None = None,
    *,
    on_start: Callable[[int], None] | None = None,
    on_video: Callable[[str], None] | None = None,
) -> list[Problem]:
    """Check every video under a frame-folder root or shard directory; [] when all is well.

    Counts agree with meta, shard bytes with their packed CRC32, every JPEG decodes at meta's
    size, and label, label_index and source path agree with the manifest (whose videos must all
    be present). A corpus of 0 videos, and shard files index.json does not name, are problems.
    `on_start(n)` is told the number of videos, `on_video(id)` each one checked (progress).
    """
    entries: dict[str, VideoEntry] | None = None
    if manifest is not None:
        try:
            entries = {e.video_id: e for e in read_manifest(Path(manifest))}
        except (ManifestError, OSError, UnicodeDecodeError) as exc:
            return [Problem("manifest", str(exc))]
    try:
        reader = open_reader(Path(path))
    except ReaderError as exc:
        return [Problem(str(path), str(exc))]
    problems = _check_corpus(Path(path), reader)
    if on_start is not None:
        on_start(len(reader.video_ids))
    try:
        for vid in reader.video_ids:
            try:
                video = reader[vid]
                problems += _check_counts(vid, video)
                if isinstance(video, ShardVideo):
                    problems += _check_shard(vid, video)
                problems += _check_images(vid, video)
                if entries is not None:
                    problems += _check_manifest(vid, video.meta, entries.get(vid))
            except ReaderError as exc:
                problems.append(Problem(vid, str(exc)))
            except Exception as exc:  # noqa: BLE001 - corrupt HDF5 can surface as any h5py error
                problems.append(Problem(vid, f"{type(exc).__name__}: {exc}"))
            if on_video is not None:
                on_video(vid)
    finally:
        if hasattr(reader, "close"):
            reader.close()
    if entries is not None:
        missing = sorted(set(entries) - set(reader.video_ids))
        problems += [Problem(v, "in the manifest but not found") for v in missing]
    return problems
