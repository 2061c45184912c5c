"""`flowprep extract --format hdf5`: extraction straight into HDF5 shards, resumably.

Split out of `shards` so that packing (and the reader) never import the extractor: this module
joins the two, `run_batch` writing frame folders into OUT/.frames and a `ShardWriter` moving
each into its shard as soon as the shard's set of videos is known.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from flowprep.decode import display_rotation
from flowprep.extract import plan, run_batch, write_reports
from flowprep.manifest import VideoEntry
from flowprep.ownership import own_folder
from flowprep.resume import VideoResult, exists, stamp_matches, turned_too_late
from flowprep.settings import ExtractSettings, RuntimeOptions
from flowprep.shards import WORK_DIR, ShardWriter, read_index


def _still_valid(index: dict, video_id: str, source: Path, settings: ExtractSettings) -> bool:
    """True when the packed copy of `video_id` was made with `settings` from this source file.

    The same test `resume.is_done` applies to a frame folder's marker.
    """
    stamp = index["stamps"].get(video_id)
    if video_id not in index["videos"] or not isinstance(stamp, dict) or not exists(source):
        return False
    return stamp_matches(stamp, settings, source) and not turned_too_late(
        stamp, source, display_rotation
    )


def extract_to_shards(
    entries: list[VideoEntry],
    video_root: Path,
    out: Path,
    settings: ExtractSettings,
    *,
    shard_size: int = 4 * 10**9,
    options: RuntimeOptions | None = None,
    jobs: int = 1,
    force: bool = False,
    strict: bool = False,
    mapper: Callable | None = None,
    on_result: Callable[[VideoResult], None] | None = None,
) -> list[VideoResult]:
    """`run_batch`, but the output is shards: OUT/index.json, OUT/shard_*.h5 and the reports.

    Each video is extracted into OUT/.frames/<video_id> (any worker, any order), moved into a
    shard as soon as its shard is complete, and its folder deleted; a video already in a shard
    with the same settings and source is skipped unless `force`. Failures and split lists are
    written to OUT as `run_batch` writes them. Returns the results sorted by video id.
    """
    out, root = Path(out), Path(video_root)
    index = read_index(out)
    unique, results = plan(entries)  # a video id two sources share fails, as in run_batch
    todo = []
    for entry in unique:
        if not force and _still_valid(index, entry.video_id, root / entry.path, settings):
            num_frames = int(index["num_frames"].get(entry.video_id, 0))
            results.append(
                VideoResult(
                    entry.video_id,
                    "skipped",
                    num_frames=num_frames,
                    # a packed video with flow has one flow per frame pair (verify checks it)
                    num_flows=num_frames - 1 if settings.wants_flow and num_frames > 1 else None,
                    source=entry.path,
                    label_index=entry.label_index,
                    splits=dict(entry.splits),
                )
            )
        else:
            todo.append(entry)
    work = out / WORK_DIR
    out.mkdir(parents=True, exist_ok=True)
    own_folder(work, "hold frame folders waiting for their shard")

    def remove_folders(video_ids: list[str]) -> None:
        for vid in video_ids:
            shutil.rmtree(work / vid)

    order = sorted(e.video_id for e in todo)
    writer = ShardWriter(work, out, order, shard_size, on_packed=remove_folders)

    def collect(result: VideoResult) -> None:
        writer.add(result.video_id, result.status != "failed")
        if on_result is not None:
            on_result(result)

    try:
        results += run_batch(
            todo,
            root,
            work,
            settings,
            options=options or RuntimeOptions(),
            jobs=jobs,
            force=force,
            strict=strict,
            mapper=mapper,
            on_result=collect,
        )
        writer.close()
    finally:
        writer.release()
    if writer.position == len(order):  # everything resolved and packed: no folder is left
        shutil.rmtree(work, ignore_errors=True)
    write_reports(out, results)
    return sorted(results, key=lambda r: r.video_id)
