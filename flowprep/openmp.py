"""Run torch on one core in the calling thread only, through torch's OpenMP runtime.

torch.set_num_threads also changes the count every later thread starts with (and MKL's, for
all threads), so a worker calling it would slow the rest of the program; OpenMP's own
omp_set_num_threads changes only the calling thread. The runtime is the one torch loaded.
"""

from __future__ import annotations

import ctypes
import re
import threading
from functools import cache
from pathlib import Path

_RUNTIME = re.compile(r"lib(g|i|)omp[^/]*\.(so|dylib)")  # libgomp (Linux), libomp (macOS), libiomp5


@cache
def _omp_set_num_threads():
    """omp_set_num_threads of torch's OpenMP runtime, or None (no OpenMP, runtime not found)."""
    import torch

    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    lib = Path(torch.__file__).parent / "lib"
    candidates = sorted(p for p in lib.iterdir() if _RUNTIME.match(p.name)) if lib.is_dir() else []
    maps = Path("/proc/self/maps")
    if not candidates and maps.exists():  # a runtime torch found elsewhere (a distro build)
        loaded = {line.split()[-1] for line in maps.read_text().splitlines() if "/" in line}
        candidates = sorted(Path(p) for p in loaded if _RUNTIME.search(Path(p).name))
    for path in candidates:
        try:
            return ctypes.CDLL(str(path)).omp_set_num_threads
        except (OSError, AttributeError):
            continue
    return None


@cache
def available() -> bool:
    """Whether one_core_in_this_thread works here: tried once, in a thread of its own.

    False where torch has no OpenMP, its runtime was not found, or the one found is not the one
    torch uses (several mapped): the thread's count would not change.
    """
    if _omp_set_num_threads() is None:
        return False
    took: list[bool] = []

    def try_it() -> None:
        try:
            took.append(one_core_in_this_thread())
        except Exception:  # noqa: BLE001 - any failure means: do not rely on it
            took.append(False)

    probe = threading.Thread(target=try_it)
    probe.start()
    probe.join()
    return took == [True]


def one_core_in_this_thread() -> bool:
    """Make torch ops of the calling thread run on one core, and say whether it took.

    torch reads a thread's count lazily on its first parallel op; reading it here first keeps
    that from undoing ours later.
    """
    import torch

    setter = _omp_set_num_threads()
    if setter is None or threading.current_thread() is threading.main_thread():
        return False
    torch.get_num_threads()  # torch's per-thread set-up, before ours
    setter(1)
    return torch.get_num_threads() == 1
