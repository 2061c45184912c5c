"""Resume: whether OUT/<video_id> is already finished for these settings and this source file.

The marker `.done` stores the settings hash and the source's size and mtime; a match (and a
readable meta.json) turns the video into a "skipped" result with its counts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flowprep.layout import MARKER, META
from flowprep.manifest import VideoEntry
from flowprep.settings import ExtractSettings


@dataclass
class VideoResult:
    """The outcome of one video: done now, skipped (already done), or failed with a reason."""

    video_id: str
    status: str  # done | skipped | failed
    num_frames: int = 0
    num_flows: int | None = None  # None: no flow extracted for this video
    reason: str = ""
    source: str = ""
    label_index: int | None = None
    splits: dict[str, str] = field(default_factory=dict)


def exists(path: Path) -> bool:
    """Path.exists() that says False, not raises, where the path cannot be looked at.

    A manifest entry with a 300-character name or in a folder this user cannot enter raises
    OSError from Path.exists(); the video then fails on its own (in failures.jsonl) when its
    extraction tries to open it, and the batch goes on.
    """
    try:
        os.stat(path)
    except (OSError, ValueError):
        return False
    return True


def source_identity(path: Path) -> dict:
    """Size and modification time of a source video, so a replaced file is redone."""
    st = path.stat()
    return {"source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}


def stamp_matches(stamp: dict, settings: ExtractSettings, source: Path) -> bool:
    """Whether a completion stamp (a `.done` marker, a shard index's stamp) was made with these
    settings from this source file."""
    return stamp.get("settings_hash") == settings.digest() and all(
        stamp.get(k) == v for k, v in source_identity(source).items()
    )


def turned_too_late(record: dict, source: Path, rotation_of: Callable[[Path], int]) -> bool:
    """Whether an output whose `record` (meta.json, a shard stamp) holds no "rotation" was
    written by a flowprep that did not turn frames upright, from a video that needs turning.

    A source that cannot be read now counts as such: it is redone, and its failure reported.
    """
    if "rotation" in record:
        return False
    try:
        return rotation_of(source) != 0
    except Exception:  # noqa: BLE001 - any decode failure: redo the video
        return True


def is_done(out_dir: Path, settings: ExtractSettings, source: Path) -> bool:
    """True when `out_dir` holds a finished video made with these settings from this file."""
    try:
        data = json.loads((out_dir / MARKER).read_text())
        return isinstance(data, dict) and stamp_matches(data, settings, source)
    except (OSError, ValueError):
        return False


def finished_result(
    entry: VideoEntry,
    video_root: Path,
    out_root: Path,
    settings: ExtractSettings,
    rotation_of: Callable[[Path], int] | None = None,
) -> VideoResult | None:
    """A "skipped" result when OUT/<video_id> is finished for these settings and this source.

    A folder whose marker matches but whose meta.json is missing or unreadable is not finished.
    Nor is one written before rotation was applied (no "rotation" in meta.json) when
    `rotation_of(source)` (`decode.display_rotation`) says the frames should have been turned.
    """
    source, final = Path(video_root) / entry.path, Path(out_root) / entry.video_id
    if not exists(source) or not is_done(final, settings, source):
        return None
    try:
        meta = json.loads((final / META).read_text())
        num_frames, num_flows = meta["num_frames"], meta.get("num_flows", 0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if any(not isinstance(n, int) or isinstance(n, bool) for n in (num_frames, num_flows)):
        return None
    if rotation_of is not None and turned_too_late(meta, source, rotation_of):
        return None  # stored sideways by a flowprep that did not turn frames upright
    return VideoResult(
        entry.video_id,
        "skipped",
        num_frames=num_frames,
        num_flows=num_flows if settings.wants_flow else None,
        source=entry.path,
        label_index=entry.label_index,
        splits=dict(entry.splits),
    )
