"""The on-disk contract of flowprep's output: file names, indexing, markers and annotation lists.

Writers (`extract`, `shards`) and readers (`reader`, `verify`, `viz`, `strnet.data`) all import
these names from here and nothing of each other's internals, so a change to the layout is made
once. Importing this module loads no decoder (no PyAV) and no torch.

A frame folder OUT/<video_id>/ holds, mmaction2-compatible and 1-based on disk:

    img_00001.jpg ...       RGB frame k (0-based k in the API is file k + 1)
    flow_x_00001.jpg ...    quantized flow k, frame k -> frame k+1 (flow_y_ likewise)
    flow_00001.npy ...      raw float32 flow k (--flow-format npy)
    meta.json               counts, sizes, settings and `file_crc32` {file name: CRC32}
    .done                   completion marker, written last

Beside the folders: the annotation lists `<split>_split<N>.txt` ("<video_id> <num_frames>
<label_index>", all.txt when no split is known) and `<split>_split<N>_flow.txt` (the number of
flows, one fewer), failures.jsonl, and a run's staging folder .partial and lock .lock.
A shard directory holds index.json and shard_NNNNN.h5 files (and a copy of the lists).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from flowprep.atomic import write_text_atomic

INDEX_BASE = 1  # file k + INDEX_BASE holds 0-based frame k
FRAME_KINDS = ("img", "flow_x", "flow_y")  # JPEG kinds of a frame folder and of a shard
META = "meta.json"  # per-video metadata
MARKER = ".done"  # per-video completion marker, written last
CHECKSUMS = "file_crc32"  # meta.json key: {frame file name: zlib.crc32 of its bytes}
PARTIAL_DIR = ".partial"  # OUT/.partial: staging folders of the run writing OUT
LOCK = ".lock"  # OUT/.lock: flock-ed by the run writing OUT while it runs (deleted at its end)
FAILURES = "failures.jsonl"  # OUT/failures.jsonl: one line per video that failed
LIST_NAME = re.compile(r"all(_flow)?\.txt|(train|test)_split\d+(_flow)?\.txt")  # annotation lists
SHARD_INDEX = "index.json"  # a shard directory's index: video -> shard file
SHARD_NAME = re.compile(r"shard_\d{5,}\.h5")  # the shard files index.json may name
SHARD_GLOB = "shard_*.h5"
CRC_SUFFIX = "_crc32"  # shard dataset <kind>_crc32: zlib.crc32 of each JPEG of <kind>


def frame_name(kind: str, index: int) -> str:
    """File name of 0-based frame `index`: img_00001.jpg, flow_x_00001.jpg, flow_00001.npy."""
    ext = "npy" if kind == "flow" else "jpg"
    return f"{kind}_{index + INDEX_BASE:05d}.{ext}"


def frame_glob(kind: str) -> str:
    """Glob pattern of every file of `kind` in a frame folder ('img_[0-9]*.jpg', ...)."""
    return f"{kind}_[0-9]*.{'npy' if kind == 'flow' else 'jpg'}"


def frame_index(name: str) -> int:
    """0-based index of frame file `name` (flow_x_00001.jpg -> 0); ValueError if not one."""
    match = re.fullmatch(r"(?:img|flow_x|flow_y|flow)_(\d{5,})\.(?:jpg|npy)", name)
    if not match:
        raise ValueError(f"not a frame file name: {name!r}")
    return int(match.group(1)) - INDEX_BASE


def shard_name(number: int) -> str:
    """File name of shard `number` (0-based): shard_00000.h5."""
    return f"shard_{number:05d}.h5"


# --------------------------------------------------------------------------- annotation lists
def list_name(
    subset: str | None = None, split: str | int | None = None, *, flow: bool = False
) -> str:
    """`<subset>_split<N>.txt` (`..._flow.txt` for a flow list), or all.txt without a subset."""
    suffix = "_flow" if flow else ""
    return f"all{suffix}.txt" if subset is None else f"{subset}_split{split}{suffix}.txt"


def list_line(video_id: str, count: int, label_index: int | None) -> str:
    """One list line, `<video_id> <count> <label_index>` (-1 for an unknown label)."""
    return f"{video_id} {count} {-1 if label_index is None else label_index}\n"


def annotation_lists(
    videos: Iterable[tuple[str, int, int | None, int | None, dict[str, str]]],
) -> dict[str, str]:
    """{list file name: text} of the finished videos (video_id, frames, flows, label, splits).

    RGB lists count frames; flow lists (`<split>_split<N>_flow.txt`, `all_flow.txt`, for videos
    with flow) count flows, one fewer, since mmaction2 samples indices up to that count. A video
    goes in the lists of each split that uses it for train or test, or in all.txt if it has none.
    """
    lists: dict[str, list[str]] = {}
    for video_id, num_frames, num_flows, label_index, splits in videos:
        counts = [(False, num_frames)] + ([(True, num_flows)] if num_flows else [])
        for flow, count in counts:
            line = list_line(video_id, count, label_index)
            if not splits:
                lists.setdefault(list_name(flow=flow), []).append(line)
            for split, kind in splits.items():
                if kind in ("train", "test"):
                    lists.setdefault(list_name(kind, split, flow=flow), []).append(line)
    return {name: "".join(lines) for name, lines in lists.items()}


def read_lists(folder: Path) -> dict[str, str]:
    """{name: text} of every annotation list file in `folder`."""
    return {
        path.name: path.read_text()
        for path in sorted(Path(folder).iterdir())
        if LIST_NAME.fullmatch(path.name) and path.is_file()
    }


def write_lists(folder: Path, lists: dict[str, str]) -> None:
    """Write each list atomically and delete the lists in `folder` that `lists` does not have.

    A list an earlier run wrote that this one would not (no video uses that split any more) is
    deleted, so no stale line remains. Names that are not list names are not written.
    """
    folder = Path(folder)
    for name, text in lists.items():
        if LIST_NAME.fullmatch(name):  # split keys are digits (checked upstream): always true
            write_text_atomic(folder / name, text)
    for stale in sorted(folder.iterdir()):
        if LIST_NAME.fullmatch(stale.name) and stale.name not in lists and not stale.is_dir():
            stale.unlink()


def read_list(path: str | Path) -> list[tuple[str, int]]:
    """(video_id, label_index) of each line `<video_id> <count> <label_index>` of a list file.

    Blank lines are skipped; a line without three fields is a ValueError naming `path:line`, a
    label that is not an integer the ValueError of int().
    """
    items = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ValueError(
                f"{path}:{n}: expected '<video_id> <num_frames> <label>', got {line!r}"
            )
        items.append((parts[0], int(parts[2])))
    return items
