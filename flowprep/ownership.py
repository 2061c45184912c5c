"""One run owns OUT at a time; finished video folders are moved into place atomically.

A run holds a flock on OUT/.lock and writes a fresh token to OUT/.partial/.owner. Workers move
a video into place only under the flock of .owner and only while it holds their run's token,
and a new run replaces the token under that flock; so worker processes that outlive a kill -9
of their run never write into OUT once a rerun started.

A finished video that is redone is replaced by an atomic exchange of the two folders where the
filesystem has one; elsewhere the old folder is moved aside with a note naming its video, and a
run killed between the two renames gets it back at the next claim. OUT/.partial and the files
flowprep makes are never followed through a planted symlink.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from flowprep.atomic import (
    exchange_paths,
    fsync_dir,
    is_locked,
    lock_exclusive,
    release_lock,
    write_json_atomic,
)
from flowprep.layout import LOCK, PARTIAL_DIR
from flowprep.manifest import safe_relative_path

OWNER = ".owner"  # OUT/.partial/.owner: that run's token; workers commit under its flock
OLD = ".old"  # OUT/.partial/<staging>.old: a finished folder moved aside while it is replaced
RESTORE = ".restore"  # OUT/.partial/<staging>.old.restore: {"video_id": ...} of that folder
LOCK_WAIT_S = 2.0  # how long a run waits for OUT/.lock before reporting OUT busy
CHECK_EVERY_S = 0.2  # how often a worker checks, between frames, that its run still owns OUT


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

    `swap_into_place` without an atomic exchange renames OUT/<id> to .partial/<x>.old (with a
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


def new_staging(out_root: Path, video_id: str, make_root: bool) -> Path:
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


def swap_into_place(staging: Path, out_root: Path, video_id: str) -> Path | None:
    """Move the finished staging folder to OUT/<video_id>; return where the older version is.

    An existing video is swapped out atomically (`exchange_paths`: the old one ends up at the
    staging path) or, where the filesystem cannot, moved aside to <staging>.old after a note
    <staging>.old.restore names it, so a kill between the two renames loses nothing
    (`restore_replaced`). Folders of the id that are symlinks are refused, not followed.
    """
    final = out_root / video_id
    for parent in reversed(PurePosixPath(video_id).parents[:-1]):
        if os.path.islink(out_root / parent):
            raise UnsafeOutput(f"output folder {parent} is a symlink; not followed")
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
