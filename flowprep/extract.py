"""Per-video extraction into frame folders and the batch that schedules it, resumably.

A video is built in its own staging folder OUT/.partial/<name>.<pid>.<random>, its completion
marker `.done` written last, then the folder is renamed into place: a kill at any moment leaves
either a finished folder or nothing. The jobs live in their own modules: `settings` (what is
written), `ownership` (OUT's lock, staging, the swap), `resume` (is a video finished),
`writing` (frames and flow into a folder); this module joins them per video and per batch.

Which run owns OUT, and how a redone video replaces the old one, is `ownership`'s docstring.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import nullcontext
from pathlib import Path, PurePosixPath

from flowprep.atomic import write_json_atomic, write_text_atomic
from flowprep.decode import VideoError, display_rotation, probe
from flowprep.flow_service import FlowService, resolve_devices
from flowprep.layout import (
    FAILURES,
    INDEX_BASE,
    LIST_NAME,
    LOCK,
    MARKER,
    META,
    PARTIAL_DIR,
    annotation_lists,
    write_lists,
)
from flowprep.manifest import VideoEntry, check_id_set, entry_problem
from flowprep.ownership import Claim, UnsafeOutput, claim_output, new_staging, swap_into_place
from flowprep.resume import VideoResult, finished_result, source_identity
from flowprep.settings import ExtractSettings, RuntimeOptions
from flowprep.writing import FlowWriter, write_frames

_RESERVED = re.compile(
    rf"({re.escape(PARTIAL_DIR)}|{re.escape(LOCK)}|{re.escape(FAILURES)}|{LIST_NAME.pattern})"
)


def extract_video(
    entry: VideoEntry,
    video_root: Path,
    out_root: Path,
    settings: ExtractSettings,
    options: RuntimeOptions = RuntimeOptions(),
    force: bool = False,
    service: FlowService | None = None,
    claim: Claim | None = None,
) -> VideoResult:
    """Extract one video into out_root/<video_id>/, or skip it when already done.

    Never raises for a bad video: the failure and its one-line reason are in the result, and
    an earlier finished output of the same video is left untouched. With a `claim` (from
    run_batch) the video is written only while that run owns OUT.
    """
    if not force:
        done = finished_result(
            entry, Path(video_root), Path(out_root), settings, rotation_of=display_rotation
        )
        if done is not None:
            return done
    source = Path(video_root) / entry.path
    result = VideoResult(
        entry.video_id,
        "done",
        source=entry.path,
        label_index=entry.label_index,
        splits=dict(entry.splits),
    )
    staging = old = None
    try:
        if claim is not None:
            claim.check()
        info = probe(source)
        staging = new_staging(Path(out_root), entry.video_id, make_root=claim is None)
        counts = write_frames(source, staging, settings, options, service, claim)
        if settings.wants_flow and counts["num_frames"] < 2:
            raise VideoError(
                f"needs >= 2 frames for flow ({counts['num_frames']} decoded, no frame pair)"
            )
        meta = {
            "video_id": entry.video_id,
            "source": entry.path,
            "label": entry.label,
            "label_index": entry.label_index,
            "source_width": info.width,
            "source_height": info.height,
            "source_fps": info.fps,
            "source_frames": info.declared_frames,
            "source_codec": info.codec,
            **counts,
            "index_base": INDEX_BASE,
            "flow_bound": settings.flow_bound if settings.wants_flow else None,
            "flow_format": settings.flow_format if settings.wants_flow else None,
            "flow_pairing": "flow k is frame k -> frame k+1" if settings.wants_flow else None,
            "settings": settings.to_dict(),
            "settings_hash": settings.digest(),
        }
        write_json_atomic(staging / META, meta)
        write_json_atomic(
            staging / MARKER,
            {
                "settings_hash": settings.digest(),
                **source_identity(source),
                "rotation": counts["rotation"],  # packed as the shard's stamp (extract_hdf5)
            },
        )
        with claim.commit() if claim is not None else nullcontext():
            old = swap_into_place(staging, Path(out_root), entry.video_id)
        result.num_frames = counts["num_frames"]
        result.num_flows = counts["num_flows"] if settings.wants_flow else None
    except (VideoError, UnsafeOutput) as exc:
        result.status, result.reason = "failed", str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad video must not stop the batch
        result.status, result.reason = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        for folder in (staging, old):
            if folder is not None and folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
    return result


def plan(entries: list[VideoEntry]) -> tuple[list[VideoEntry], list[VideoResult]]:
    """Split entries into unique work and failures for ids that two sources share.

    Ids whose first part names one of flowprep's own files in OUT (.partial, .lock, the
    reports), and entries `entry_problem` refuses (whitespace in an id, bad splits or label
    index), fail too. An id set where one id is a folder of another raises ManifestError.
    """
    check_id_set(entries)
    seen: dict[str, VideoEntry] = {}
    clashes = []
    for entry in entries:
        problem = entry_problem(entry)
        if problem is None and _RESERVED.fullmatch(PurePosixPath(entry.video_id).parts[0]):
            problem = "video id is reserved for flowprep's own files in the output folder"
        elif problem is None and entry.video_id in seen:
            problem = f"video id also used by {seen[entry.video_id].path}"
        if problem is not None:
            clashes.append(VideoResult(entry.video_id, "failed", source=entry.path, reason=problem))
        else:
            seen[entry.video_id] = entry
    return list(seen.values()), clashes


def write_reports(out_root: Path, results: list[VideoResult]) -> None:
    """Write failures.jsonl and mmaction2-style `<split>_split<N>.txt` lists, sorted, atomically.

    RGB lists count frames; flow lists (`<split>_split<N>_flow.txt`, `all_flow.txt`, for videos
    with flow) count flows, one fewer, since mmaction2 samples indices up to that count. Every
    list is rebuilt from this run's finished videos, and a list an earlier run wrote that this
    one would not (no entry uses that split any more) is deleted, so no stale line remains.
    """
    out_root = Path(out_root)
    ordered = sorted(results, key=lambda r: (r.video_id, r.source))
    failures = [r for r in ordered if r.status == "failed"]
    write_text_atomic(
        out_root / FAILURES,
        "".join(
            json.dumps({"video_id": r.video_id, "source": r.source, "reason": r.reason}) + "\n"
            for r in failures
        ),
    )
    good = [r for r in ordered if r.status != "failed"]
    write_lists(
        out_root,
        annotation_lists(
            (r.video_id, r.num_frames, r.num_flows, r.label_index, r.splits) for r in good
        ),
    )


def run_batch(
    entries: list[VideoEntry],
    video_root: Path,
    out_root: Path,
    settings: ExtractSettings,
    *,
    options: RuntimeOptions = RuntimeOptions(),
    jobs: int = 1,
    force: bool = False,
    strict: bool = False,
    mapper: Callable[..., Iterator[VideoResult]] | None = None,
    on_result: Callable[[VideoResult], None] | None = None,
) -> list[VideoResult]:
    """Extract every entry with `jobs` parallel workers, then write the reports.

    `mapper(function, argument tuples)` yields results in any order. By default RGB and OpenCV
    flow run in `jobs` joblib processes; torch flow runs `jobs` decoding threads that share one
    FlowService (a thread per device), so decoding, flow and JPEG encoding overlap. With
    `strict`, the batch stops at the first failure; videos it did not get to that are already
    finished are still reported (as skipped) and listed. The run owns OUT while it works
    (`claim_output`; OutputBusy if another live run does). Results come back sorted by video id.
    """
    out_root = Path(out_root)
    work, results = plan(entries)
    with claim_output(out_root) as claim:
        service = None
        if mapper is None and settings.wants_flow and settings.flow_backend == "torch":
            devices = resolve_devices(options.device)
            service = FlowService(
                devices,
                backend="torch",
                compile=options.flow_compile,
                device_batch=options.device_batch,
                chunk=options.flow_batch,
            )
            mapper = thread_mapper(max(jobs, decoders_per_device(devices, options) * len(devices)))
        root = Path(video_root)
        args = [(e, root, out_root, settings, options, force, service, claim) for e in work]
        stream = (mapper or joblib_mapper(jobs))(extract_video, args)
        visited = set()
        try:
            for result in stream:
                visited.add(result.video_id)
                results.append(result)
                if on_result:
                    on_result(result)
                if strict and result.status == "failed":
                    break
        finally:
            claim.revoke()  # no worker moves a video into place from here on
            stream.close()  # stops the workers before the service they may still be using
            if service is not None:
                service.close()
        for entry in work:  # not reached (--strict): finished ones still belong in the lists
            if entry.video_id in visited:
                continue
            done = finished_result(entry, root, out_root, settings, display_rotation)
            if done is not None:
                results.append(done)
                if on_result:
                    on_result(done)
        write_reports(out_root, results)
    return sorted(results, key=lambda r: r.video_id)


def decoders_per_device(devices: list[str], options: RuntimeOptions) -> int:
    """Decoding threads that keep one flow device fed: 2 for the CPU, more for a GPU.

    A GPU needs enough videos queued to fill two device batches (one computing, one waiting),
    and each video has at most MAX_INFLIGHT + 1 chunks of `flow_batch` pairs queued.
    """
    if devices == ["cpu"]:
        return 2
    per_video = (FlowWriter.MAX_INFLIGHT + 1) * options.flow_batch
    return max(2, math.ceil(2 * options.device_batch / per_video))


def joblib_mapper(jobs: int) -> Callable[..., Iterator[VideoResult]]:
    """Map with joblib processes (inline when jobs == 1), yielding results as they finish."""

    def mapper(
        function: Callable[..., VideoResult], arg_list: list[tuple]
    ) -> Iterator[VideoResult]:
        if jobs == 1:
            yield from (function(*a) for a in arg_list)
            return
        from joblib import Parallel, delayed

        from flowprep.workers import die_with_parent

        parallel = Parallel(
            n_jobs=jobs,
            return_as="generator_unordered",
            initializer=die_with_parent,  # a kill -9 of the run ends its workers too
            initargs=(os.getpid(),),
        )
        yield from parallel(delayed(function)(*a) for a in arg_list)

    return mapper


def thread_mapper(threads: int) -> Callable[..., Iterator[VideoResult]]:
    """Map with a thread pool, yielding results as they finish; closing it cancels the rest.

    Threads suit the torch flow path: PyAV decoding, OpenCV resizing/encoding and torch kernels
    release the GIL, and all threads share one FlowService and its devices.
    """

    def mapper(
        function: Callable[..., VideoResult], arg_list: list[tuple]
    ) -> Iterator[VideoResult]:
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="video")
        try:
            futures = [pool.submit(function, *a) for a in arg_list]
            for future in as_completed(futures):
                yield future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    return mapper
