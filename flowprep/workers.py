"""Worker processes that end with the run that started them, even after a kill -9 of the run.

joblib's loky workers wait for tasks on a pipe whose write end they hold themselves, so the
death of the run does not wake them: a worker that had no task in hand when the run was
killed (still starting up, or idle) sat there until loky's idle timeout, 300 s (issue 13,
case 14). `die_with_parent` is the workers' initializer, run as each worker starts: a worker
whose run is already gone exits at once; on Linux the kernel then signals the worker when its
parent dies (prctl PR_SET_PDEATHSIG), elsewhere a daemon thread polls os.getppid().

Loky starts its workers from the run's own process (the main thread, or its executor-manager
thread), so a worker's parent is the run. PR_SET_PDEATHSIG fires when the *thread* that started
the worker ends, not only the process, so the signal is a handled one that exits only when
os.getppid() shows that the run itself is gone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_S = 0.5  # how often the watch thread looks at os.getppid() (where there is no prctl)


def die_with_parent(parent_pid: int) -> None:
    """Make this worker process exit as soon as `parent_pid` is no longer its parent.

    Call it first thing in the worker (a loky initializer). Exits at once when the parent has
    already gone.
    """
    if os.getppid() != parent_pid:
        os._exit(1)
    if not _death_signal(parent_pid):
        _watch(parent_pid)


def _death_signal(parent_pid: int) -> bool:
    """Ask Linux for a signal when the parent dies; whether that is in place."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return False  # Python runs signal handlers in the main thread only
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    signum = signal.SIGRTMIN + 1  # a signal nothing else in a worker uses

    def on_signal(_signum: int, _frame: object) -> None:
        if os.getppid() != parent_pid:  # not just the thread that started us
            os._exit(1)

    previous = signal.signal(signum, on_signal)
    if prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        signal.signal(signum, previous)
        return False
    if os.getppid() != parent_pid:  # died before the request was in place
        os._exit(1)
    return True


def _watch(parent_pid: int) -> None:
    """Exit within POLL_S of the parent's death, from a daemon thread."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="flowprep-parent-watch", daemon=True).start()
