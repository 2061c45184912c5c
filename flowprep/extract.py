"""Per-video extraction of RGB frames (and optical flow) into frame folders, resumably.

A video is built in its own staging folder OUT/.partial/<name>.<pid>.<random>, its completion
marker `.done` written last, then the folder is renamed into place: a kill at any moment leaves
either a finished folder or nothing.

One run owns OUT at a time (`claim_output`): it holds a flock on OUT/.lock and writes a fresh
token to OUT/.partial/.owner. Workers move a video into place only under the flock of .owner and
only while it holds their run's token, and a new run replaces the token under that flock; so
worker processes that outlive a kill -9 of their run never write into OUT once a rerun started
(they also stop within a fraction of a second when their parent dies).

A finished video that is redone (--force, changed settings) is replaced by an atomic exchange
of the two folders where the filesystem has one; elsewhere the old folder is moved aside with a
note naming its video, and a run killed between the two renames gets it back at the next claim.
OUT/.partial and the files flowprep makes are never followed through a planted symlink.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import os
import re
import secrets
import shutil
import stat
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

from flowprep.atomic import (
    exchange_paths,
    fsync_dir,
    is_locked,
    lock_exclusive,
    release_lock,
    write_json_atomic,
    write_text_atomic,
)
from flowprep.decode import DecodeStats, VideoError, iter_frames, probe
from flowprep.flow_service import DEVICE_BATCH, FlowService, resolve_devices
from flowprep.layout import (  # noqa: F401 - names of the layout kept importable from here
    CHECKSUMS,
    FAILURES,
    INDEX_BASE,
    LIST_NAME,
    LOCK,
    MARKER,
    META,
    PARTIAL_DIR,
    annotation_lists,
    frame_name,
    write_lists,
)
from flowprep.manifest import (
    VideoEntry,
    check_id_set,
    entry_problem,
    safe_relative_path,
)

OWNER = ".owner"  # OUT/.partial/.owner: that run's token; workers commit under its flock
OLD = ".old"  # OUT/.partial/<staging>.old: a finished folder moved aside while it is replaced
RESTORE = ".restore"  # OUT/.partial/<staging>.old.restore: {"video_id": ...} of that folder
LOCK_WAIT_S = 2.0  # how long a run waits for OUT/.lock before reporting OUT busy
CHECK_EVERY_S = 0.2  # how often a worker checks, between frames, that its run still owns OUT
_RESERVED = re.compile(
    rf"({re.escape(PARTIAL_DIR)}|{re.escape(LOCK)}|{re.escape(FAILURES)}|{LIST_NAME.pattern})"
)
MODALITIES = ("rgb", "flow", "both")


@dataclass(frozen=True)
class ExtractSettings:
    """Everything that changes what extraction writes; its hash guards resume."""

    short_side: int = 256  # resize so the short side has this length; 0 keeps the source size
    jpeg_quality: int = 95  # JPEG quality of RGB and flow images (denseflow and cv2 default)
    modality: str = "rgb"  # rgb | flow | both
    flow_backend: str = "torch"  # torch | opencv (flowprep.flow.compute_flow backends)
    flow_bound: float = 20.0  # flow is clipped to +-bound px before quantization (papers: 20)
    flow_format: str = "jpeg"  # jpeg (quantized, flow_x/flow_y) | npy (raw float32 per pair)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg quality must be 1..100, got {self.jpeg_quality}")
        if self.short_side < 0:
            raise ValueError(f"short side must be >= 0, got {self.short_side}")
        if self.flow_bound <= 0:
            raise ValueError(f"flow bound must be > 0, got {self.flow_bound}")
        if self.flow_format not in ("jpeg", "npy"):
            raise ValueError(f"flow format must be jpeg or npy, got {self.flow_format!r}")

    @property
    def wants_rgb(self) -> bool:
        return self.modality in ("rgb", "both")

    @property
    def wants_flow(self) -> bool:
        return self.modality in ("flow", "both")

    def to_dict(self) -> dict:
        """The settings that shape the output (flow ones only when flow is written)."""
        data = asdict(self)
        if not self.wants_flow:
            for key in ("flow_backend", "flow_bound", "flow_format"):
                data.pop(key)
        return data

    def digest(self) -> str:
        """A short stable hash of `to_dict()`, stored in every marker and meta.json."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run, not what to write: these never invalidate finished videos."""

    device: str = "auto"  # flow device: auto | cpu | cuda
    flow_batch: int = 8  # frame pairs per chunk a video sends for flow
    flow_compile: bool | str = "auto"  # torch.compile TV-L1: True, False, or "auto" (>= 160x120)
    device_batch: int = DEVICE_BATCH  # pairs per device call, joined from several videos' chunks
    threads: int = 0  # decoder threads per video (0 = FFmpeg's choice)


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


class OutputError(RuntimeError):
    """OUT cannot be written by this run; str() is one line (the CLI exits 1)."""


class OutputBusy(OutputError):
    """OUT is being written by another live run; str() is one line."""


class UnsafeOutput(OutputError):
    """A path flowprep manages in OUT is a symlink or not what it should be; never followed."""


def unwritable(path: Path, exc: OSError) -> OutputError:
    """OutputError for an OUT that cannot be written (read-only, no space left, no permission)."""
    return OutputError(f"{exc.filename or path}: cannot write the output ({exc.strerror or exc})")


class Superseded(RuntimeError):
    """The run that started this work died or was replaced by a rerun: the work is dropped."""


@dataclass
class Claim:
    """A run's ownership of OUT, handed to its workers (picklable: processes and Dask too)."""

    out_root: Path
    token: str
    pid: int  # the run's process
    _checked: float = field(default=0.0, compare=False, repr=False)  # last check (monotonic)

    @property
    def owner_file(self) -> Path:
        return self.out_root / PARTIAL_DIR / OWNER

    def current(self) -> bool:
        """True while the run is alive (holds OUT/.lock) and no rerun has replaced its token."""
        if os.getpid() != self.pid and not is_locked(self.out_root / LOCK):
            return False
        try:
            return self.owner_file.read_text() == self.token
        except OSError:
            return False

    def check(self) -> None:
        """Raise Superseded when the run no longer owns OUT (looks at most every CHECK_EVERY_S)."""
        now = time.monotonic()
        if now - self._checked >= CHECK_EVERY_S:
            if not self.current():
                raise Superseded("the run that started this video died or was replaced")
            self._checked = now

    @contextmanager
    def commit(self) -> Iterator[None]:
        """Hold the flock of .owner, and raise Superseded unless this run still owns OUT."""
        try:
            fd = os.open(self.owner_file, os.O_RDWR | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError):
            raise Superseded("the run that started this video has ended") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.pread(fd, 256, 0).decode(errors="replace") != self.token or (
                os.getpid() != self.pid and not is_locked(self.out_root / LOCK)
            ):
                raise Superseded("the run that started this video died or was replaced")
            yield
        finally:
            os.close(fd)

    def revoke(self) -> None:
        """End the claim: a commit in progress completes, none starts after this returns."""
        try:
            _write_owner(self.out_root / PARTIAL_DIR, "")
        except OSError:
            pass


def _write_owner(partial: Path, token: str) -> None:
    fd = os.open(partial / OWNER, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits for a worker's commit in progress
        os.ftruncate(fd, 0)
        os.pwrite(fd, token.encode(), 0)
    finally:
        os.close(fd)


@contextmanager
def claim_output(out_root: Path) -> Iterator[Claim]:
    """Own OUT for a run: lock it, take over from any killed run, clean up staging at the end.

    Raises OutputBusy when another live run holds OUT/.lock for more than LOCK_WAIT_S,
    UnsafeOutput when OUT/.lock or OUT/.partial is a symlink (nothing is followed or deleted
    through it), and OutputError (one line) when OUT cannot be written: read-only, no space
    left, no permission. Finished videos a killed run had moved aside are put back first.
    """
    out_root = Path(out_root)
    try:
        out_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise unwritable(out_root, exc) from None
    try:
        lock_fd = lock_exclusive(out_root / LOCK, LOCK_WAIT_S)
    except OSError as exc:
        _refuse_link(out_root / LOCK, "lock")
        raise unwritable(out_root / LOCK, exc) from None
    if lock_fd is None:
        raise OutputBusy(
            f"{out_root}: another flowprep run is writing here (it holds {LOCK}); "
            "wait for it to finish"
        )
    partial = out_root / PARTIAL_DIR
    try:
        own_folder(partial, "stage videos in")
        owner = partial / OWNER
        if os.path.lexists(owner) and not stat.S_ISREG(os.lstat(owner).st_mode):
            owner.unlink()  # not ours: a planted link is removed, never written through
    except OSError as exc:
        release_lock(out_root / LOCK, lock_fd)
        raise unwritable(partial, exc) from None
    except BaseException:
        release_lock(out_root / LOCK, lock_fd)
        raise
    claim = Claim(out_root, f"{os.getpid()}-{secrets.token_hex(8)}", os.getpid())
    try:
        try:
            _write_owner(partial, claim.token)  # workers of a killed run can no longer commit
            restore_replaced(out_root)
            for child in partial.iterdir():  # leftovers of killed runs
                if child.name != OWNER:
                    _remove(child)
        except OSError as exc:
            raise unwritable(partial, exc) from None
        yield claim
    finally:
        claim.revoke()
        restore_replaced(out_root)  # a replacement that failed between its renames
        shutil.rmtree(partial, ignore_errors=True)  # rmtree never follows a symlink
        release_lock(out_root / LOCK, lock_fd)


def _refuse_link(path: Path, role: str) -> None:
    """Raise UnsafeOutput when `path` is a symlink: flowprep follows no link it did not make."""
    if os.path.islink(path):
        raise UnsafeOutput(
            f"{path} is a symlink; flowprep will not follow it to {role} (remove it and rerun)"
        )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def own_folder(path: Path, role: str) -> None:
    """Create `path` as a real folder, or check that it is one (never a symlink to elsewhere).

    `role` says what the folder is for, in the UnsafeOutput message.
    """
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    _refuse_link(path, role)
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise UnsafeOutput(f"{path} is not a folder; flowprep needs it to {role}")


def restore_replaced(out_root: Path) -> list[str]:
    """Put back finished folders a replacement moved aside but did not replace; their ids.

    `_swap_into_place` without an atomic exchange renames OUT/<id> to .partial/<x>.old (with a
    note <x>.old.restore naming <id>), then the new folder to OUT/<id>. Killed in between,
    OUT/<id> is missing and the old copy is the only one: it goes back before .partial is wiped.
    """
    partial, restored = Path(out_root) / PARTIAL_DIR, []
    for note in sorted(partial.glob(f"*{OLD}{RESTORE}")):
        old = note.with_name(note.name[: -len(RESTORE)])
        try:
            if not note.is_file() or note.is_symlink():
                continue
            video_id = safe_relative_path(
                json.loads(note.read_text())["video_id"], where=str(note), what="video_id"
            )
            final = Path(out_root) / video_id
            if stat.S_ISDIR(os.lstat(old).st_mode) and not os.path.lexists(final):
                final.parent.mkdir(parents=True, exist_ok=True)
                os.rename(old, final)
                restored.append(video_id)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # no folder to restore, or a note that is not ours
    return restored


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


def is_done(out_dir: Path, settings: ExtractSettings, source: Path) -> bool:
    """True when `out_dir` holds a finished video made with these settings from this file."""
    marker = out_dir / MARKER
    try:
        data = json.loads(marker.read_text())
        return data.get("settings_hash") == settings.digest() and all(
            data.get(k) == v for k, v in source_identity(source).items()
        )
    except (OSError, ValueError):
        return False


def finished_result(
    entry: VideoEntry, video_root: Path, out_root: Path, settings: ExtractSettings
) -> VideoResult | None:
    """A "skipped" result when OUT/<video_id> is finished for these settings and this source.

    A folder whose marker matches but whose meta.json is missing or unreadable is not finished.
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
    return VideoResult(
        entry.video_id,
        "skipped",
        num_frames=num_frames,
        num_flows=num_flows if settings.wants_flow else None,
        source=entry.path,
        label_index=entry.label_index,
        splits=dict(entry.splits),
    )


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of an (H, W) gray or (H, W, 3) RGB uint8 image.

    OpenCV's libjpeg is deterministic, which the byte-identical resume relies on.
    """
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise VideoError(f"JPEG encoding failed for a {image.shape} frame")
    return buf.tobytes()


def write_frame_file(folder: Path, name: str, data: bytes, checksums: dict[str, int]) -> None:
    """Write one frame file and note its CRC32 in `checksums` (meta.json's CHECKSUMS).

    The reader and `verify` compare each file they read with it, so a flipped bit that still
    decodes is found; `pack` checks it too before copying the bytes into a shard.
    """
    (folder / name).write_bytes(data)
    checksums[name] = zlib.crc32(data)


class FlowWriter:
    """Batch consecutive grayscale frames into pairs and write flow k (frame k -> frame k+1).

    Chunks are always pairs [k*B, (k+1)*B) of one video, whichever device computes them, so the
    output does not depend on timing. Up to MAX_INFLIGHT chunks are computed while decoding goes
    on; only `flow_batch` + 1 frames per chunk are held, so long videos stream in bounded memory.
    """

    MAX_INFLIGHT = 2

    def __init__(
        self,
        folder: Path,
        settings: ExtractSettings,
        options: RuntimeOptions,
        service: FlowService | None = None,
        checksums: dict[str, int] | None = None,
    ):
        from flowprep.quantize import quantize_flow  # flow pulls in torch: import only when needed

        self.folder, self.settings, self.options = folder, settings, options
        self.checksums = {} if checksums is None else checksums
        self._quantize = quantize_flow
        self._submit = service.submit if service is not None else self._compute_here
        self.pending: list[np.ndarray] = []
        self.inflight: deque[Future] = deque()
        self.written = 0

    def _compute_here(self, prev: np.ndarray, nxt: np.ndarray) -> Future:
        from flowprep.flow import compute_flow

        future: Future = Future()
        flow = compute_flow(
            prev,
            nxt,
            backend=self.settings.flow_backend,
            device=self.options.device,
            compile=self.options.flow_compile,
        )
        future.set_result(np.asarray(flow, dtype=np.float32))
        return future

    def add(self, rgb: np.ndarray) -> None:
        self.pending.append(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        if len(self.pending) > self.options.flow_batch:
            self._send()

    def _send(self) -> None:
        if len(self.pending) >= 2:
            frames = np.stack(self.pending)
            self.inflight.append(self._submit(frames[:-1], frames[1:]))
            self.pending = self.pending[-1:]
        while len(self.inflight) > self.MAX_INFLIGHT:
            self._write_chunk(self.inflight.popleft().result())

    def finish(self) -> None:
        """Send the last partial chunk and write every outstanding one, in order."""
        self._send()
        while self.inflight:
            self._write_chunk(self.inflight.popleft().result())

    def _write_chunk(self, flow: np.ndarray) -> None:
        for pair in flow:
            self._write(pair)

    def _write(self, pair: np.ndarray) -> None:
        s = self.settings
        if s.flow_format == "npy":
            buf = io.BytesIO()
            np.save(buf, pair)
            name = frame_name("flow", self.written)
            write_frame_file(self.folder, name, buf.getvalue(), self.checksums)
        else:
            q = self._quantize(pair, s.flow_bound)
            for channel, kind in enumerate(("flow_x", "flow_y")):
                data = encode_jpeg(np.ascontiguousarray(q[..., channel]), s.jpeg_quality)
                name = frame_name(kind, self.written)
                write_frame_file(self.folder, name, data, self.checksums)
        self.written += 1


def _write_frames(
    source: Path,
    folder: Path,
    settings: ExtractSettings,
    options: RuntimeOptions,
    service: FlowService | None,
    claim: Claim | None = None,
) -> dict:
    """Decode `source` into `folder`; return the counts, sizes, rotation and CRCs for meta.json."""
    checksums: dict[str, int] = {}
    flow = (
        FlowWriter(folder, settings, options, service, checksums) if settings.wants_flow else None
    )
    count, shape, stats = 0, (0, 0), DecodeStats()
    frames = iter_frames(
        source, short_side=settings.short_side, threads=options.threads, stats=stats
    )
    for rgb in frames:
        if claim is not None:
            claim.check()
        if settings.wants_rgb:
            data = encode_jpeg(rgb, settings.jpeg_quality)
            write_frame_file(folder, frame_name("img", count), data, checksums)
        if flow is not None:
            flow.add(rgb)
        shape = rgb.shape[:2]
        count += 1
    if flow is not None:
        flow.finish()
    return {
        "num_frames": count,
        "height": shape[0],
        "width": shape[1],
        "num_flows": flow.written if flow else 0,
        "rotation": stats.rotation,  # degrees clockwise the decoded frames were turned upright
        CHECKSUMS: checksums,
    }


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
        done = finished_result(entry, Path(video_root), Path(out_root), settings)
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
        staging = _new_staging(Path(out_root), entry.video_id, make_root=claim is None)
        counts = _write_frames(source, staging, settings, options, service, claim)
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
            staging / MARKER, {"settings_hash": settings.digest(), **source_identity(source)}
        )
        with claim.commit() if claim is not None else nullcontext():
            old = _swap_into_place(staging, Path(out_root), entry.video_id)
        result.num_frames = counts["num_frames"]
        result.num_flows = counts["num_flows"] if settings.wants_flow else None
    except VideoError as exc:
        result.status, result.reason = "failed", str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad video must not stop the batch
        result.status, result.reason = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        for folder in (staging, old):
            if folder is not None and folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
    return result


def _new_staging(out_root: Path, video_id: str, make_root: bool) -> Path:
    """A fresh staging folder of this attempt, OUT/.partial/<name>.<pid>.<random>.

    Within a run, OUT/.partial exists; it is not recreated, so a worker of an ended run fails
    here instead of leaving files behind.
    """
    partial = out_root / PARTIAL_DIR
    if make_root:
        partial.mkdir(parents=True, exist_ok=True)
    name = PurePosixPath(video_id).name[:64]
    while True:
        staging = partial / f"{name}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            staging.mkdir()
            return staging
        except FileExistsError:
            continue


def _swap_into_place(staging: Path, out_root: Path, video_id: str) -> Path | None:
    """Move the finished staging folder to OUT/<video_id>; return where the older version is.

    An existing video is swapped out atomically (`exchange_paths`: the old one ends up at the
    staging path) or, where the filesystem cannot, moved aside to <staging>.old after a note
    <staging>.old.restore names it, so a kill between the two renames loses nothing
    (`restore_replaced`). Folders of the id that are symlinks are refused, not followed.
    """
    final = out_root / video_id
    for parent in reversed(PurePosixPath(video_id).parents[:-1]):
        if os.path.islink(out_root / parent):
            raise VideoError(f"output folder {parent} is a symlink; not followed")
    final.parent.mkdir(parents=True, exist_ok=True)
    if not os.path.lexists(final):
        os.rename(staging, final)
        fsync_dir(final.parent)
        return None
    if exchange_paths(staging, final):  # fsyncs both folders
        return staging
    old = staging.with_name(staging.name + OLD)
    note = old.with_name(old.name + RESTORE)
    write_json_atomic(note, {"video_id": video_id})
    os.rename(final, old)
    try:
        os.rename(staging, final)
    except BaseException:
        os.rename(old, final)
        raise
    fsync_dir(final.parent)
    note.unlink()
    return old


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
            done = finished_result(entry, root, out_root, settings)
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
