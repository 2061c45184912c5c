"""Atomic writes, locks and the path exchange: planted symlinks are never written through."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flowprep import atomic
from flowprep.atomic import exchange_paths, lock_exclusive, temp_name, write_text_atomic


@pytest.mark.parametrize("dangling", [False, True])
def test_planted_temp_symlink_is_replaced_not_followed(tmp_path: Path, dangling: bool) -> None:
    victim = tmp_path / "victim.txt"
    if not dangling:
        victim.write_text("keep me\n")
    target = tmp_path / "out" / "failures.jsonl"
    target.parent.mkdir()
    temp_name(target).symlink_to(victim)  # OUT/.failures.jsonl.tmp -> a file elsewhere
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n" and not target.is_symlink()
    assert not os.path.lexists(temp_name(target))
    if dangling:
        assert not victim.exists()  # nothing was created through the link
    else:
        assert victim.read_text() == "keep me\n"


def test_stale_temp_file_of_a_killed_writer_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "all.txt"
    temp_name(target).write_text("half of an old wri")
    write_text_atomic(target, "a 3 -1\n")
    assert target.read_text() == "a 3 -1\n" and not temp_name(target).exists()


def test_failed_write_leaves_no_temporary(tmp_path: Path, monkeypatch) -> None:
    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(tmp_path / "a.txt", "x")
    assert list(tmp_path.iterdir()) == []


def test_lock_file_symlink_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / ".lock").symlink_to(tmp_path / "created-elsewhere")
    with pytest.raises(OSError):
        lock_exclusive(tmp_path / ".lock")
    assert not (tmp_path / "created-elsewhere").exists()


def test_exchange_swaps_two_folders_or_says_it_cannot(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "new").write_text("new")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "old").write_text("old")
    if exchange_paths(tmp_path / "a", tmp_path / "b"):
        assert [p.name for p in (tmp_path / "a").iterdir()] == ["old"]
        assert [p.name for p in (tmp_path / "b").iterdir()] == ["new"]
    atomic._renameat2.cache_clear()
    monkeypatch.setattr(atomic.ctypes, "CDLL", lambda *a, **k: object())  # no renameat2
    try:
        assert exchange_paths(tmp_path / "a", tmp_path / "b") is False
    finally:
        atomic._renameat2.cache_clear()


def test_write_fsyncs_the_file_then_its_folder(tmp_path: Path, monkeypatch) -> None:
    import stat

    synced, real = [], os.fsync

    def spy(fd: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    write_text_atomic(tmp_path / "a.txt", "x")
    assert synced == ["file", "folder"]  # the rename is durable once the folder is synced
    assert (tmp_path / "a.txt").read_text() == "x"


def test_a_folder_that_cannot_be_synced_is_skipped(tmp_path: Path, monkeypatch) -> None:
    import errno

    real = os.fsync

    def no_dir_sync(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd)

    monkeypatch.setattr(os, "fsync", no_dir_sync)
    write_text_atomic(tmp_path / "a.txt", "y")
    assert (tmp_path / "a.txt").read_text() == "y"


def test_lock_directory_is_exclusive_across_processes(tmp_path):
    """One implementation of flock for lock files and for folders locked as they are."""
    import subprocess
    import sys

    from flowprep.atomic import lock_directory

    folder = tmp_path / "shards"
    folder.mkdir()
    fd = lock_directory(folder)
    assert fd is not None and sorted(folder.iterdir()) == []  # no lock file added
    probe = "import sys; from flowprep.atomic import lock_directory as f; print(f(sys.argv[1]))"

    def other_process() -> str:
        cmd = [sys.executable, "-c", probe, str(folder)]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()

    assert other_process() == "None"  # busy while this process holds it
    os.close(fd)
    assert other_process().isdigit()  # free once released
