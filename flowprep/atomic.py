"""Atomic file writes: a temporary name in the same folder, fsync, rename, fsync the folder.

A reader (or a rerun after a kill) sees the old file or the new one, never half of one.
Also the flock helpers that let one run own an output folder at a time, and an atomic exchange
of two paths (renameat2) for replacing a finished folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def temp_name(path: Path) -> Path:
    """The temporary name `write_bytes_atomic` writes `path` under: .<name>.tmp beside it."""
    return Path(path).with_name(f".{Path(path).name}.tmp")


def open_new(path: Path, mode: int = 0o644) -> int:
    """A write fd on a file created fresh at `path`, never through a symlink planted there.

    A stale file or symlink at `path` (a killed writer, or someone else's plant) is unlinked
    first, which removes the link and not its target; O_CREAT | O_EXCL | O_NOFOLLOW then fails
    rather than follow anything that appears at `path` in between.
    """
    for _ in range(3):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        except FileExistsError:
            continue  # recreated between unlink and open: unlink it again
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)


# errors of fsync on a folder from filesystems that cannot sync one: the rename still happened
_NO_DIR_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR}


def fsync_dir(path: Path) -> None:
    """fsync the folder `path`, so the names a rename just put there survive a crash.

    A rename is durable only once its folder is synced; where a folder cannot be opened or the
    filesystem does not sync folders, this does nothing (the rename itself has happened).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIR_SYNC:
            raise
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(file)` on a temporary file beside `path`, fsync, rename it to `path`, then
    fsync the folder: the one atomic write of the project (bytes, text, JSON, checkpoints).

    A kill at any moment leaves the old file or the new one, never half of one, and no
    temporary file when it is an exception. The temporary file is created fresh (`open_new`),
    so a symlink planted at its name is never followed; the rename replaces a symlink at
    `path` itself, never its target.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        with os.fdopen(open_new(tmp), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # a full disk or a kill signal leaves no temporary behind
        raise
    fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically; the temporary file never follows a symlink."""
    write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with UTF-8 `text` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: object) -> None:
    """Replace `path` with `data` as indented, key-sorted JSON (stable bytes for equal data)."""
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def lock_exclusive(path: Path, wait_s: float = 0.0) -> int | None:
    """An exclusive flock on `path` (created if missing): its open fd, or None if still busy.

    Retries for up to `wait_s` seconds. The fd is not inherited by child processes (PEP 446),
    so the lock is released as soon as this process closes it or dies, even by kill -9. The
    holder deletes the file as it lets go (`release_lock`); whoever then gets the lock on the
    deleted file notices and locks the new one instead.
    A symlink at `path` is not followed (OSError ELOOP), so no file is created through it.
    """
    deadline = time.monotonic() + wait_s
    while True:
        fd = _flocked(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644))
        if fd is None:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)
            continue
        if _same_file(fd, path):
            return fd
        os.close(fd)  # its holder deleted it meanwhile: lock the current file


def lock_directory(path: Path) -> int | None:
    """An exclusive flock on the directory `path` itself: its open fd, or None if busy.

    For folders whose contents are the product (a shard folder): no lock file is added. Released
    when the fd is closed or the process dies. `path` is the user's output folder, which may
    well be a symlink to another disk: locking through it creates and follows nothing further.
    """
    return _flocked(os.open(path, os.O_RDONLY | os.O_DIRECTORY))


def _flocked(fd: int) -> int | None:
    """`fd` once it holds an exclusive flock; closed and None if another process holds one."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def release_lock(path: Path, fd: int) -> None:
    """Delete the lock file of `lock_exclusive`, then release the lock (in that order)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.close(fd)


def is_locked(path: Path) -> bool:
    """True while another open file of `path` holds a flock on it (a missing file: False).

    Finds out by taking a shared lock for an instant, so never call it from the process that
    holds the lock (on NFS, where flock is emulated by per-process record locks, closing this
    second descriptor would drop the holder's lock).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock, when we got it
    return False


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}


@functools.lru_cache(maxsize=1)
def _renameat2() -> Callable[..., int] | None:
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc >= 2.28 (musl, macOS): no exchange
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap what `a` and `b` name in one atomic step; False where the system cannot.

    Linux renameat2(RENAME_EXCHANGE): a crash leaves either both old names or both new ones.
    Old kernels, NFS and other filesystems without it give False, and the caller falls back.
    """
    func = _renameat2()
    if func is None:
        return False
    if func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        for folder in dict.fromkeys((Path(a).parent, Path(b).parent)):
            fsync_dir(folder)
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
