"""Torch TV-L1 on the CPU from different threads: how the cores are used, and the libgomp pitfall.

libgomp gives each thread that runs a parallel torch op its own OpenMP team and keeps it; a
thread that starts a team while another thread's team exists (more OpenMP threads than cores)
runs its ops several times slower. Eager CPU flow therefore runs a pair per single-threaded
thread (no OpenMP); compiled flow runs pair by pair on all cores in the calling thread. Each case
runs in a fresh process, on --pairs real pairs at 341x256, and times compute_flow(device="cpu"):
  main          called from the main thread (a script)
  thread        from a new thread; the main thread never ran torch (flowprep extract's flow thread)
  thread-after  from a new thread, after the main thread ran compute_flow on one pair (a program
                calling compute_flow, then run_batch)
  all-cores     the other way, for comparison: tvl1 pair by pair on all cores, from the main thread
                (eager compute_flow did this before; compiled compute_flow does it now)
Each case runs --repeats times (fresh processes, interleaved); the median is printed.
Run by hand: python benchmarks/threads.py [--pairs 4] [--repeats 3] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

CASES = ("main", "thread", "thread-after", "all-cores")


def run_case(case: str, pairs: int, compile: bool) -> float:
    """Pairs/s of `case` in this (fresh) process, after a warm-up that compiles if asked."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from flow import real_pairs  # benchmarks/flow.py: consecutive frames of the sample clips

    from flowprep.flow import compute_flow
    from flowprep.tvl1 import tvl1

    prev, nxt = real_pairs(pairs)  # numpy: converting here would be torch work in this thread

    def flow(count: int = pairs) -> None:
        compute_flow(prev[:count], nxt[:count], device="cpu", compile=compile)

    def all_cores() -> None:
        with torch.inference_mode():
            for i in range(pairs):
                i0 = torch.from_numpy(prev[i : i + 1]).float()
                tvl1(i0, torch.from_numpy(nxt[i : i + 1]).float(), compile=compile)

    def in_thread(target, *args) -> None:
        thread = threading.Thread(target=target, args=args)
        thread.start()
        thread.join()

    if case == "main":
        timed = flow
    elif case == "thread":
        timed = lambda: in_thread(flow)  # noqa: E731
    elif case == "thread-after":
        flow(1)  # the main thread's OpenMP team now exists
        timed = lambda: in_thread(flow)  # noqa: E731
    else:
        timed = all_cores
    timed()  # warm up (compile, or load the compiled kernels)
    start = time.perf_counter()
    timed()
    return pairs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in-process
    args = parser.parse_args()
    compile = not args.no_compile
    if args.case:
        print(json.dumps(run_case(args.case, args.pairs, compile)))
        return
    print(f"torch TV-L1, CPU, {os.cpu_count()} cores, compile={compile}, {args.pairs} pairs")
    runs: dict[str, list[float]] = {case: [] for case in CASES}
    for _ in range(args.repeats):  # interleaved, so a busy spell on a shared machine hits all
        for case in CASES:
            cmd = [sys.executable, __file__, "--case", case, "--pairs", str(args.pairs)]
            cmd += ["--no-compile"] if args.no_compile else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[case].append(float(out.strip().splitlines()[-1]))
    rates = {case: statistics.median(r) for case, r in runs.items()}
    for case in CASES:
        spread = ", ".join(f"{r:.2f}" for r in runs[case])
        print(
            f"{case:>13}: {rates[case]:6.2f} pairs/s  {rates[case] / rates['all-cores']:.2f}x "
            f"all-cores  (runs: {spread})"
        )


if __name__ == "__main__":
    main()
