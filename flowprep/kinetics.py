"""Kinetics-style annotations: CSV rows (youtube_id, time_start, time_end, label, split) -> entries.

The official Kinetics-400/600/700 files (`train.csv`, `validate.csv`, `test.csv`) start with a
header naming their columns, `label,youtube_id,time_start,time_end,split[,is_cc]`; a test file
may lack `label`. The common downloaders (ActivityNet's `Crawler/Kinetics/download.py` and its
forks) save each clip as `<youtube_id>_<time_start:06d>_<time_end:06d>.mp4`, in one folder or in
class or split folders: a clip is found by its file name anywhere under the video root (any
video extension).

- Video ids are the clip names (`-abc123_000010_000020`): unique, and independent of the folders
  a downloader chose.
- Manifest split "1": `train` -> train, `val`/`validate` -> test (papers report Kinetics on its
  validation set, as Hara et al. 2017, Table 2), `test` -> unused (its labels are withheld).
- Label indices are the sorted class names of all the CSVs (as mmaction2), whether or not their
  clips were downloaded, so they do not change with what is missing.
- Every value ends up in a path or a list line, so each is checked, with one line naming
  `file:line`: youtube_id of letters, digits, `_` and `-`; times non-negative integers with
  end > start; labels of letters, digits, spaces and ()'-,.&+:;!? without `..`; known splits.
- Clips the CSVs list but the video root lacks are returned as missing, not an error: Kinetics
  clips vanish from YouTube and no download is complete.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from flowprep.atomic import write_text_atomic
from flowprep.manifest import ManifestError, VideoEntry, find_videos, printable

KINETICS_COLUMNS = ("youtube_id", "time_start", "time_end", "split")  # `label` may be absent
KINETICS_SPLITS = {"train": "train", "val": "test", "validate": "test", "test": "unused"}
_YOUTUBE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)
_LABEL = re.compile(r"[\w ()'\-,.&+:;!?]{1,200}")
_TIME = re.compile(r"[0-9]{1,9}", re.ASCII)


@dataclass(frozen=True)
class KineticsClip:
    """One annotation row, checked."""

    youtube_id: str
    start: int
    end: int
    label: str | None
    split: str  # the CSV's split name
    where: str  # file:line

    @property
    def name(self) -> str:
        """The file name the downloaders give the clip, without extension."""
        return clip_name(self.youtube_id, self.start, self.end)


def clip_name(youtube_id: str, start: int, end: int) -> str:
    """`<youtube_id>_<start:06d>_<end:06d>`, the downloaders' clip name (no extension)."""
    return f"{youtube_id}_{start:06d}_{end:06d}"


def _header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [c.strip() for c in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def kinetics_csvs(split_dir: Path) -> list[Path]:
    """The CSV files in `split_dir` whose header names a `youtube_id` column, sorted."""
    return [p for p in sorted(Path(split_dir).glob("*.csv")) if "youtube_id" in _header(p)]


def _check_row(row: dict, where: str) -> KineticsClip:
    """A CSV row as a KineticsClip, or ManifestError naming `where` and the bad value."""
    yid = (row.get("youtube_id") or "").strip()
    if not _YOUTUBE_ID.fullmatch(yid):
        raise ManifestError(f"{where}: youtube_id {yid!r} must be 1-64 letters, digits, _ or -")
    times = []
    for key in ("time_start", "time_end"):
        text = (row.get(key) or "").strip()
        if not _TIME.fullmatch(text):
            raise ManifestError(f"{where}: {key} {text!r} must be a non-negative integer")
        times.append(int(text))
    if times[1] <= times[0]:
        raise ManifestError(f"{where}: time_end {times[1]} must be after time_start {times[0]}")
    label = (row.get("label") or "").strip() or None
    if label is not None and (not _LABEL.fullmatch(label) or ".." in label):
        raise ManifestError(
            f"{where}: label {label!r} must be letters, digits, spaces and ()'-,.&+:;!? "
            "(no '/', '..' or control characters)"
        )
    split = (row.get("split") or "").strip()
    if split not in KINETICS_SPLITS:
        raise ManifestError(f"{where}: split {split!r} must be one of {', '.join(KINETICS_SPLITS)}")
    if label is None and split != "test":
        raise ManifestError(f"{where}: a {split} clip needs a label")
    return KineticsClip(yid, times[0], times[1], label, split, where)


def read_kinetics_csv(path: Path) -> list[KineticsClip]:
    """The checked rows of one annotation CSV; ManifestError (one line, file:line) otherwise."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError:
        raise ManifestError(f"{printable(path)}: not a UTF-8 text file") from None
    except csv.Error as exc:
        raise ManifestError(f"{printable(path)}: not CSV ({exc})") from None
    if not rows:
        raise ManifestError(f"{printable(path)}: empty; expected a header row")
    header = [c.strip() for c in rows[0]]
    lacking = [c for c in KINETICS_COLUMNS if c not in header]
    if lacking:
        raise ManifestError(f"{printable(path)}:1: no column {lacking[0]!r} in the header")
    clips = []
    for n, values in enumerate(rows[1:], 2):
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise ManifestError(
                f"{printable(path)}:{n}: {len(values)} fields, the header has {len(header)}"
            )
        clips.append(_check_row(dict(zip(header, values, strict=True)), f"{printable(path)}:{n}"))
    return clips


def clip_files(video_root: Path) -> dict[str, str]:
    """Clip name (file name without extension) -> path relative to `video_root`.

    Two files with one clip name (`a/x.mp4`, `b/x.mkv`) are a ManifestError naming both.
    """
    files: dict[str, str] = {}
    for rel in find_videos(video_root):
        stem = PurePosixPath(rel).stem
        if stem in files:
            raise ManifestError(
                f"{printable(video_root)}: two files for clip {stem!r}: {files[stem]}, {rel}"
            )
        files[stem] = rel
    return files


def index_kinetics(video_root: Path, split_dir: Path) -> tuple[list[VideoEntry], list[str]]:
    """Entries of the clips the CSVs in `split_dir` list and `video_root` holds; and the missing.

    `missing` holds one `<clip name> <file:line>` line per listed clip without a file. A clip
    listed twice is an error naming both lines.
    """
    paths = kinetics_csvs(split_dir)
    if not paths:
        raise ManifestError(f"{printable(split_dir)}: no CSV file with a youtube_id column")
    clips: dict[str, KineticsClip] = {}
    for path in paths:
        for clip in read_kinetics_csv(path):
            if clip.name in clips:
                raise ManifestError(
                    f"{clip.where}: clip {clip.name!r} is already listed at "
                    f"{clips[clip.name].where}"
                )
            clips[clip.name] = clip
    labels = sorted({c.label for c in clips.values() if c.label is not None})
    index = {name: i for i, name in enumerate(labels)}
    files = clip_files(video_root)
    entries, missing = [], []
    for name in sorted(clips):
        clip = clips[name]
        if name not in files:
            missing.append(f"{name} {clip.where}")
            continue
        label_index = None if clip.label is None else index[clip.label]
        splits = {"1": KINETICS_SPLITS[clip.split]}
        entries.append(VideoEntry(name, files[name], clip.label, label_index, splits))
    return entries, missing


def missing_list_path(manifest: Path) -> Path:
    """Where `flowprep index` lists the missing clips of a manifest: `<stem>_missing.txt`."""
    return Path(manifest).with_name(f"{Path(manifest).stem}_missing.txt")


def write_missing_list(manifest: Path, missing: list[str]) -> Path | None:
    """Write `missing` beside the manifest (atomically); with none, delete a stale list."""
    path = missing_list_path(manifest)
    if not missing:
        path.unlink(missing_ok=True)
        return None
    write_text_atomic(path, "".join(f"{line}\n" for line in missing))
    return path
