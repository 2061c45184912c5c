"""Video manifests from UCF101 / HMDB51 split files or a folder-per-class tree.

A manifest is JSON lines, one video each: id, path relative to the video root, label name,
0-based label index and, per official split, whether the video is train, test or unused.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from flowprep.atomic import write_text_atomic

VIDEO_EXTENSIONS = (
    ".avi",
    ".mp4",
    ".mkv",
    ".webm",
    ".mov",
    ".m4v",
    ".mpg",
    ".mpeg",
    ".flv",
    ".wmv",
)
SPLITS = ("1", "2", "3")
SPLIT_KINDS = ("train", "test", "unused")
_SPLIT_KEY = re.compile(r"[0-9]+")  # becomes part of a list file name: <kind>_split<N>.txt
_UNSAFE_NAME = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")  # would break a "<id> <frames> <label>" line
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class ManifestError(ValueError):
    """A split file or manifest that cannot be used; the message names the file and the cause."""


@dataclass
class VideoEntry:
    """One video of a corpus: where it is and how the official splits use it."""

    video_id: str  # path without extension, "/"-separated; names the output folder
    path: str  # relative to the video root, "/"-separated
    label: str | None = None
    label_index: int | None = None  # 0-based
    splits: dict[str, str] = field(default_factory=dict)  # split number -> train|test|unused


def safe_relative_path(
    raw: str, *, where: str, what: str = "path", inside: str = "the video root"
) -> str:
    """Return `raw` as a normalised relative posix path that cannot leave its root.

    Split files and manifests are user input: empty, absolute paths and `..` components are
    rejected with a one-line ManifestError naming `where` (file:line), `what` the value is and
    the folder it must stay `inside`. The check is lexical on purpose, so a corpus whose class
    folders are symlinks to other disks still indexes.
    """
    text = raw.strip().replace("\\", "/")
    posix = PurePosixPath(text)
    if not posix.parts or posix.parts == (".",):
        raise ManifestError(f"{where}: {what} {raw!r} is empty")
    if posix.is_absolute() or re.match(r"^[A-Za-z]:", text):
        raise ManifestError(f"{where}: {what} {raw!r} is absolute; it must be a relative path")
    if ".." in posix.parts:
        raise ManifestError(f"{where}: {what} {raw!r} leaves {inside} ('..' is not allowed)")
    return str(posix)


def name_problem(text: str) -> str | None:
    """Why `text` cannot be a video id or path (whitespace, control characters), or None.

    Ids start the lines of the split lists, which are split on whitespace, so one space or
    newline in an id would shift or inject fields.
    """
    bad = _UNSAFE_NAME.search(text)
    if bad is None:
        return None
    kind = "a control character" if _CONTROL.match(bad.group()) else "whitespace"
    return f"contains {kind} {bad.group()!r}"


def printable(path: object) -> str:
    """`path` as text for a one-line message: as is, or quoted when it holds a control character
    (a file name with a newline must not split an error or a progress line in two)."""
    text = str(path)
    return repr(text) if _CONTROL.search(text) else text


def entry_problem(entry: VideoEntry) -> str | None:
    """Why `entry` cannot be extracted as it is (bad id, path, label or splits), or None.

    Splits name list files and label indices fill list lines, so they are checked as strictly
    as paths: split keys are digits, kinds train/test/unused, label_index a non-negative int.
    """
    for what, text in (("video_id", entry.video_id), ("path", entry.path)):
        problem = name_problem(text) if isinstance(text, str) else "is not a string"
        if problem:
            return f"{what} {text!r} {problem}"
    if entry.label is not None and (
        not isinstance(entry.label, str) or _CONTROL.search(entry.label)
    ):
        return f"label {entry.label!r} must be a string without control characters, or null"
    index = entry.label_index
    if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
        return f"label_index {index!r} must be a non-negative integer or null"
    if not isinstance(entry.splits, dict):
        return f"splits {entry.splits!r} must be an object"
    for key, kind in entry.splits.items():
        if not isinstance(key, str) or not _SPLIT_KEY.fullmatch(key):
            return f"split key {key!r} must be a split number (digits only)"
        if kind not in SPLIT_KINDS:
            return f"split {key} is {kind!r}; expected one of {', '.join(SPLIT_KINDS)}"
    return None


def nested_ids(video_ids: Iterable[str]) -> tuple[str, str] | None:
    """The first (outer, inner) pair where one id is a folder of the other, or None.

    OUT/<outer>/ is a finished video folder; OUT/<outer>/<rest> inside it would be deleted with
    it on a redo and hidden from the reader, so such id sets are refused before any work.
    """
    ids = set(video_ids)
    for vid in sorted(ids):
        for parent in reversed(PurePosixPath(vid).parents[:-1]):
            if str(parent) in ids:
                return str(parent), vid
    return None


def check_id_set(entries: Iterable[VideoEntry], where: str | None = None) -> None:
    """Raise ManifestError naming both ids when one video id is a folder of another.

    `where` (the corpus or manifest) starts the one-line message when given.
    """
    clash = nested_ids(e.video_id for e in entries)
    if clash is not None:
        outer, inner = clash
        raise ManifestError(
            f"{where + ': ' if where else ''}video ids {outer!r} and {inner!r} clash: the output "
            f"folder of {outer!r} would hold {inner!r}"
        )


def video_id_for(rel_path: str) -> str:
    """The output id of a video: its relative path without the extension."""
    return str(PurePosixPath(rel_path).with_suffix(""))


def _read_lines(path: Path) -> list[tuple[int, str]]:
    text = path.read_text(encoding="utf-8", errors="strict")
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_ucf101_classes(class_file: Path) -> dict[str, int]:
    """Parse classInd.txt ("1 ApplyEyeMakeup") into {class name: 0-based index}."""
    classes: dict[str, int] = {}
    for n, line in _read_lines(class_file):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise ManifestError(f"{class_file}:{n}: expected '<1-based id> <class>', got {line!r}")
        classes[parts[1]] = int(parts[0]) - 1
    if sorted(classes.values()) != list(range(len(classes))):
        raise ManifestError(f"{class_file}: class ids are not 1..{len(classes)} without gaps")
    return classes


def index_ucf101(split_dir: Path) -> list[VideoEntry]:
    """Manifest from UCF101's classInd.txt, trainlist0N.txt and testlist0N.txt (N = 1..3).

    Labels come from classInd (1-based in the file, 0-based here, as mmaction2 does); the class
    of a listed video is the folder in its path. Videos a split does not list are "unused" there.
    """
    classes = read_ucf101_classes(split_dir / "classInd.txt")
    entries: dict[str, VideoEntry] = {}
    present = [s for s in SPLITS if (split_dir / f"trainlist0{s}.txt").exists()]
    if not present:
        raise ManifestError(f"{split_dir}: no trainlist01.txt next to classInd.txt")
    for split in present:
        for kind in ("train", "test"):
            list_file = split_dir / f"{kind}list0{split}.txt"
            if not list_file.exists():
                raise ManifestError(f"{list_file}: missing (its trainlist exists)")
            for n, line in _read_lines(list_file):
                where = f"{list_file}:{n}"
                rel = safe_relative_path(line.split()[0], where=where)
                label = PurePosixPath(rel).parts[0] if len(PurePosixPath(rel).parts) > 1 else None
                if label not in classes:
                    raise ManifestError(
                        f"{where}: class {label!r} of {rel!r} is not in classInd.txt"
                    )
                entry = entries.setdefault(
                    rel, VideoEntry(video_id_for(rel), rel, label, classes[label])
                )
                entry.splits[split] = kind
    for entry in entries.values():
        for split in present:
            entry.splits.setdefault(split, "unused")
    return sorted(entries.values(), key=lambda e: e.video_id)


_HMDB_SPLIT = re.compile(r"^(?P<label>.+)_test_split(?P<split>[123])\.txt$")
_HMDB_KIND = {"0": "unused", "1": "train", "2": "test"}


def index_hmdb51(split_dir: Path) -> list[VideoEntry]:
    """Manifest from HMDB51's <class>_test_split{1,2,3}.txt (1 = train, 2 = test, 0 = unused).

    Label indices follow the sorted class names, as mmaction2 does; videos live in <class>/.
    """
    files = sorted(p for p in split_dir.iterdir() if _HMDB_SPLIT.match(p.name))
    if not files:
        raise ManifestError(f"{split_dir}: no <class>_test_split<N>.txt files")
    labels = sorted({_HMDB_SPLIT.match(p.name)["label"] for p in files})  # type: ignore[index]
    index = {name: i for i, name in enumerate(labels)}
    entries: dict[str, VideoEntry] = {}
    for path in files:
        m = _HMDB_SPLIT.match(path.name)
        assert m is not None
        label, split = m["label"], m["split"]
        for n, line in _read_lines(path):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in _HMDB_KIND:
                raise ManifestError(f"{path}:{n}: expected '<video file> <0|1|2>', got {line!r}")
            name = safe_relative_path(parts[0], where=f"{path}:{n}")  # before the class folder
            rel = f"{label}/{name}"
            entry = entries.setdefault(rel, VideoEntry(video_id_for(rel), rel, label, index[label]))
            entry.splits[split] = _HMDB_KIND[parts[1]]
    return sorted(entries.values(), key=lambda e: e.video_id)


def find_videos(root: Path) -> list[str]:
    """Relative posix paths of every video file under `root`, sorted (symlinks followed).

    A folder that cannot be read is a ManifestError, not a skip: in a folder-per-class tree a
    missing class would shift every later label index. A folder reached a second time (same
    device and inode: a symlink loop, or two links to one folder) is reported, not followed.
    """
    root = Path(root)
    found: list[str] = []
    seen: dict[tuple[int, int], Path] = {}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                raise ManifestError(
                    f"{printable(folder)}: same folder (device and inode) as "
                    f"{printable(seen[key])}: a symlink loop or a second link; not followed"
                )
            seen[key] = folder
            with os.scandir(folder) as it:
                children = sorted(it, key=lambda e: e.name)
            folders = {e.name for e in children if e.is_dir()}
        except OSError as exc:
            raise ManifestError(
                f"{printable(folder)}: cannot read folder ({exc.strerror or exc})"
            ) from None
        for e in children:
            if e.name.lower().endswith(VIDEO_EXTENSIONS) and e.name not in folders:
                found.append(Path(e.path).relative_to(root).as_posix())
        stack.extend(folder / name for name in sorted(folders, reverse=True))
    return sorted(found)


def index_folder(video_root: Path) -> list[VideoEntry]:
    """Manifest of a folder-per-class tree: the first folder of each path is its class.

    Videos directly in the root get no label (a plain folder of videos). No splits are known.
    """
    paths = find_videos(video_root)
    labels = sorted({PurePosixPath(p).parts[0] for p in paths if len(PurePosixPath(p).parts) > 1})
    index = {name: i for i, name in enumerate(labels)}
    entries = []
    for rel in paths:
        parts = PurePosixPath(rel).parts
        label = parts[0] if len(parts) > 1 else None
        entries.append(VideoEntry(video_id_for(rel), rel, label, index.get(label)))  # type: ignore[arg-type]
    return entries


def detect_format(split_dir: Path | None) -> str:
    """Which split layout `split_dir` holds: "ucf101", "hmdb51" or "folder" (no split files)."""
    if split_dir is None:
        return "folder"
    if (split_dir / "classInd.txt").exists():
        return "ucf101"
    if any(_HMDB_SPLIT.match(p.name) for p in split_dir.iterdir()):
        return "hmdb51"
    from flowprep.kinetics import kinetics_csvs  # Kinetics CSVs (imports this module)

    if kinetics_csvs(split_dir):
        return "kinetics"
    raise ManifestError(
        f"{split_dir}: neither classInd.txt (UCF101), *_test_split1.txt (HMDB51) nor CSV files "
        "with a youtube_id column (Kinetics)"
    )


def build_manifest(
    video_root: Path, split_dir: Path | None = None, fmt: str = "auto", missing: list | None = None
) -> list[VideoEntry]:
    """Index a corpus in the layout `fmt` (auto-detected from `split_dir` by default).

    Kinetics (`flowprep.kinetics`): clips the CSVs list but `video_root` lacks are left out of
    the entries and appended to `missing` (`<clip> <file:line>` lines) when it is given.

    Entries the manifest reader would refuse (`entry_problem`: a file name with whitespace or
    control characters) and id sets where one id is a folder of another are refused here.
    """
    video_root = Path(video_root)
    if not video_root.is_dir():
        raise ManifestError(f"{video_root}: video root is not a directory")
    fmt = detect_format(split_dir) if fmt == "auto" else fmt
    if fmt == "folder":
        entries = index_folder(video_root)
    elif split_dir is None:
        raise ManifestError(f"format {fmt!r} needs the folder holding its split files (--splits)")
    elif fmt == "kinetics":
        from flowprep.kinetics import index_kinetics

        entries, absent = index_kinetics(video_root, Path(split_dir))
        (missing if missing is not None else []).extend(absent)
    else:
        entries = {"ucf101": index_ucf101, "hmdb51": index_hmdb51}[fmt](Path(split_dir))
    for entry in entries:
        problem = entry_problem(entry)
        if problem is not None:
            raise ManifestError(f"{printable(video_root / entry.path)}: {problem}")
    check_id_set(entries, str(split_dir if fmt != "folder" else video_root))
    return entries


def write_manifest(entries: Iterable[VideoEntry], path: Path) -> None:
    """Write entries as JSON lines, atomically (temporary name, then rename)."""
    lines = (json.dumps(asdict(entry), sort_keys=True) + "\n" for entry in entries)
    write_text_atomic(Path(path), "".join(lines))


def _manifest_text(raw: dict, key: str, where: str) -> str:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ManifestError(f"{where}: {key} must be a string, got {value!r}")
    return str(value)


def read_manifest(path: Path) -> list[VideoEntry]:
    """Read a JSON-lines manifest; a malformed line is a one-line ManifestError.

    `video_id` names a folder under the output root and `path` a file under the video root, so
    both must be non-empty relative paths without `..` (they are normalised like split paths),
    whitespace or control characters; labels, label indices and splits are checked by
    `entry_problem`, and id sets by `check_id_set` (naming both lines).
    """
    entries = []
    lines: dict[str, int] = {}
    for n, line in _read_lines(Path(path)):
        where = f"{path}:{n}"
        try:
            raw = json.loads(line)
            video_id = safe_relative_path(
                _manifest_text(raw, "video_id", where),
                where=where,
                what="video_id",
                inside="the output folder",
            )
            rel = safe_relative_path(_manifest_text(raw, "path", where), where=where)
            splits = raw.get("splits") or {}
            if not isinstance(splits, dict):
                raise ManifestError(f"{where}: splits {splits!r} must be an object")
            entry = VideoEntry(
                video_id=video_id,
                path=rel,
                label=raw.get("label"),
                label_index=raw.get("label_index"),
                splits=dict(splits),
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(f"{where}: not a manifest line ({exc})") from None
        problem = entry_problem(entry)
        if problem is not None:
            raise ManifestError(f"{where}: {problem}")
        entries.append(entry)
        lines.setdefault(video_id, n)
    clash = nested_ids(lines)
    if clash is not None:
        outer, inner = clash
        raise ManifestError(
            f"{path}:{lines[inner]}: video id {inner!r} lies inside the output folder of "
            f"video id {outer!r} (line {lines[outer]})"
        )
    return entries
