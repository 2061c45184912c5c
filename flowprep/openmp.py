"""torch's OpenMP runtime: short spin-waits on a busy machine, one core per solver thread.

Importing this module (flowprep.flow and flowprep.flow_service do, before torch is loaded) sets
GOMP_SPINCOUNT=1000 unless the user chose a wait policy (`limit_spinning`). libgomp's default
is to spin 300,000 times at every join before sleeping (up to milliseconds, as long as a
scheduler slice), so when other processes hold the cores a team thread burns its slice waiting
for a partner that is not running. Compiled TV-L1 joins ~40 times an iteration; with two
busy-loop processes beside it its CPU time grew 3-5x and it fell behind OpenCV (BENCHMARKS.md,
"Flow on a busy machine"). 1000 spins (300x fewer) is libgomp's own count for teams larger
than the cores under OMP_WAIT_POLICY=ACTIVE (100 without); on a quiet machine it cost nothing
measurable, where OMP_WAIT_POLICY=PASSIVE (no spinning) cost 8 % wall time. The runtime reads
it once, when it is loaded, so it must be in the environment before torch is first imported;
worker processes inherit it.

torch.set_num_threads also changes the count every later thread starts with (and MKL's, for
all threads), so a worker calling it would slow the rest of the program; OpenMP's own
omp_set_num_threads changes only the calling thread. The runtime is the one torch loaded.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import threading
from collections.abc import MutableMapping
from functools import cache
from pathlib import Path

_RUNTIME = re.compile(r"lib(g|i|)omp[^/]*\.(so|dylib)")  # libgomp (Linux), libomp (macOS), libiomp5
SPIN_COUNT = "1000"  # GOMP_SPINCOUNT flowprep sets (libgomp default: 300000)
_WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # a user who set one keeps their choice


def limit_spinning(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set GOMP_SPINCOUNT=SPIN_COUNT in `environ` for torch's OpenMP runtime; whether it did.

    Left alone when the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT, and when torch is already
    imported in this process (its runtime has read the environment: setting it now would only
    mislead). Called when this module is imported.
    """
    if any(name in environ for name in _WAIT_SETTINGS):
        return False
    if environ is os.environ and "torch" in sys.modules:
        return False
    environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True


limit_spinning()


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
