"""Atomic file writes: a temporary name in the same folder, fsync, then rename.

A reader (or a rerun after a kill) sees the old file or the new one, never half of one.
Also the flock helpers that let one run own an output folder at a time.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    """
    deadline = time.monotonic() + wait_s
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)
            continue
        if _same_file(fd, path):
            return fd
        os.close(fd)  # its holder deleted it meanwhile: lock the current file


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
