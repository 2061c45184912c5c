"""TV-L1 optical flow of grayscale frame pairs: our batched torch solver or OpenCV's DualTVL1.

`compute_flow` is the one entry point; both backends take OpenCV's parameter names and defaults
and return flow in OpenCV's convention, prev(x, y) ≈ nxt(x + u, y + v).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from dataclasses import fields
from typing import Any

import numpy as np

from flowprep import openmp
from flowprep.tvl1 import TVL1Params, check_torch_params

BACKENDS = ("torch", "opencv")
CPU_CHUNK_PIXELS = 1 << 17  # pixels per torch call on the CPU (one 341x256 pair = 87 k)
# Compiled CPU kernels split a pair's reductions over threads when it is alone, so compiled
# pairs of this many pixels and up are always solved alone: extract joins pairs of several
# videos by timing, and a pair's flow must not depend on its batch mates. (Eagerly the solver
# sums row by row, batch-invariant; see tvl1.pair_sums.)
CPU_ALONE_PIXELS = 1 << 14
AUTO_COMPILE_PIXELS = 1 << 14  # compile="auto" compiles frames this large (160x120 and up)
_compile_failure: str | None = None  # why torch.compile failed in this process, once it has
_compiled_sizes: set[tuple[str, int, int]] = set()  # (device type, H, W) compiled in this process
log = logging.getLogger(__name__)
_ALIASES = {
    "lambda": "lambda_",
    "scaleStep": "scale_step",
    "innerIterations": "inner_iterations",
    "outerIterations": "outer_iterations",
    "medianFiltering": "median_filtering",
}


def make_params(**params: Any) -> TVL1Params:
    """TVL1Params from keyword arguments, accepting `lambda` and OpenCV's camelCase names.

    Unknown names fail with a one-line ValueError rather than being silently ignored.
    """
    known = {f.name for f in fields(TVL1Params)}
    kwargs = {}
    for key, value in params.items():
        name = _ALIASES.get(key, key)
        if name not in known:
            raise ValueError(f"unknown TV-L1 parameter {key!r}; known: {sorted(known)}")
        kwargs[name] = value
    return TVL1Params(**kwargs)


def _as_batch(prev: np.ndarray, nxt: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Validate shapes and return float32 (N, H, W) frames on OpenCV's 0..255 scale.

    uint8 frames are taken as they are; float frames are read as 0..1 and scaled by 255, as
    OpenCV's DualTVL1 does.
    """
    prev, nxt = np.asarray(prev), np.asarray(nxt)
    if prev.shape != nxt.shape:
        raise ValueError(f"prev and nxt shapes differ: {prev.shape} vs {nxt.shape}")
    if prev.ndim not in (2, 3):
        raise ValueError(f"frames must be (H, W) or (N, H, W) grayscale, got shape {prev.shape}")
    single = prev.ndim == 2
    if single:
        prev, nxt = prev[None], nxt[None]
    if prev.shape[0] == 0:
        raise ValueError("no frame pairs given (N = 0)")
    if min(prev.shape[1:]) < 2:
        raise ValueError(f"frames must be at least 2x2 pixels, got {prev.shape[1]}x{prev.shape[2]}")
    out = []
    for a in (prev, nxt):
        if a.dtype == np.uint8:
            a = a.astype(np.float32)
        elif np.issubdtype(a.dtype, np.floating):
            a = a.astype(np.float32) * 255.0
        else:
            raise ValueError(f"frames must be uint8 or float, got {a.dtype}")
        if not np.isfinite(a).all():
            raise ValueError("frames contain NaN or infinity")
        out.append(a)
    return out[0], out[1], single


def resolve_device(device: str) -> str:
    """Torch device for `device`: auto picks CUDA when torch sees one, else the CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested, but torch sees no CUDA device")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:i], got {device!r}")
    return device


def wants_compile(compile: bool | str, height: int, width: int) -> bool:
    """Whether to torch.compile a job of (height, width) frames: "auto" does from 160x120 up.

    Below that a pair takes milliseconds eagerly and the one-off compile (seconds) cannot pay;
    at the papers' 341x256 it runs ~2-3x faster than eager on the CPU (BENCHMARKS.md).
    """
    if compile == "auto":
        return height * width >= AUTO_COMPILE_PIXELS
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    return compile


def _out_of_memory(exc: BaseException | None) -> bool:
    """Whether `exc` is torch's out-of-memory error, or wraps one.

    Inductor wraps errors raised while it compiles, so the cause chain is followed.
    """
    import torch

    seen = 0
    while exc is not None and seen < 16:
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _solve(i0, i1, params: TVL1Params, compile: bool):
    """tvl1 with compile, falling back to eager (warning once) if torch.compile cannot run.

    A missing C++ compiler or Triton must cost speed, not the job; an error that eager hits too
    (bad input, out of memory) still raises.
    """
    global _compile_failure
    from flowprep.tvl1 import tvl1

    if compile and _compile_failure is None:
        size = (i0.device.type, *i0.shape[-2:])
        if size not in _compiled_sizes:
            _compiled_sizes.add(size)
            log.info(
                "TV-L1: compiling kernels for %dx%d frames on %s (first use of this size in this "
                "run: seconds from the disk cache, up to a minute without)",
                size[2], size[1], size[0],
            )  # fmt: skip
        try:
            return tvl1(i0, i1, params, compile=True)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: go on eagerly
            if _out_of_memory(exc):  # not the compiler's fault: keep compiling, let it raise
                raise
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            _compile_failure = f"{type(exc).__name__}: {reason}"[:200]
            warnings.warn(
                f"torch.compile failed ({_compile_failure}); computing TV-L1 flow eagerly",
                RuntimeWarning,
                stacklevel=3,
            )
    return tvl1(i0, i1, params, compile=False)


def _flow_torch(
    prev: np.ndarray, nxt: np.ndarray, device: str, params: TVL1Params, compile: bool = False
) -> np.ndarray:
    """Batched torch TV-L1 of float32 (N, H, W) frames -> (N, H, W, 2)."""
    import torch

    dev = torch.device(resolve_device(device))
    # On the CPU the iterations are memory-bound: one 341x256 pair's working set already exceeds
    # L2, so larger batches only run slower; solve a cache-sized chunk of pairs at a time, and
    # from CPU_ALONE_PIXELS on one pair at a time.
    n, h, w = prev.shape
    if dev.type == "cuda":
        chunk = n
    else:
        chunk = 1 if h * w >= CPU_ALONE_PIXELS else max(1, CPU_CHUNK_PIXELS // (h * w))

    def solve(start: int) -> np.ndarray:
        with torch.inference_mode():
            i0 = torch.from_numpy(prev[start : start + chunk]).to(dev)
            i1 = torch.from_numpy(nxt[start : start + chunk]).to(dev)
            u = _solve(i0, i1, params, compile)
            return u.permute(0, 2, 3, 1).cpu().numpy()

    starts = list(range(0, n, chunk))
    threads = min(len(starts), torch.get_num_threads())
    if dev.type == "cpu" and not compile and threads > 1 and openmp.available():
        return np.concatenate(run_single_threaded(solve, starts, threads))
    return np.concatenate([solve(start) for start in starts])


def run_single_threaded(function: Any, items: list, threads: int) -> list:
    """[function(item) for item in items] on `threads` new threads, each running torch on 1 core.

    How the eager CPU solver uses the cores: one chunk of pairs per thread, not one chunk on all
    cores. Its ops on a 341x256 pair are too small for OpenMP to pay for its ~40 joins per
    iteration (1.1-1.6x faster this way on 2 cores), and a thread that runs torch on several
    cores is 3x slower once another thread (the main one, say) has done so too: libgomp keeps a
    team per thread and throttles both (benchmarks/threads.py). If the caller is interrupted
    (Ctrl-C), the threads finish the item in hand and take no more before it re-raises: a
    process must not exit while they are inside torch.
    """
    results: list = [None] * len(items)
    errors: list[BaseException] = []
    stop = threading.Event()
    queue = iter(range(len(items)))
    lock = threading.Lock()

    def work(done: threading.Event) -> None:
        try:
            openmp.one_core_in_this_thread()  # not torch.set_num_threads: that is process-wide
            while not stop.is_set():
                with lock:
                    i = next(queue, None)
                if i is None:
                    return
                results[i] = function(items[i])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(exc)
            stop.set()  # the other threads take no more items
        finally:
            done.set()

    # Events, not Thread.join: an interrupted join marks a running thread stopped (Python 3.11)
    workers: list[tuple[threading.Thread, threading.Event]] = []
    try:
        for k in range(threads):
            done = threading.Event()
            thread = threading.Thread(target=work, args=(done,), name=f"flowprep-tvl1-{k}")
            thread.daemon = True
            workers.append((thread, done))
            thread.start()
        for _, done in workers:
            done.wait()
    except BaseException:  # Ctrl-C, say: let the threads leave torch before the caller goes on
        stop.set()
        for thread, done in workers:
            if thread.ident is not None:  # started (start() itself may be what was interrupted)
                done.wait()
        raise
    if errors:
        raise errors[0]
    return results


def opencv_tvl1(
    prev: np.ndarray, nxt: np.ndarray, params: TVL1Params, threads: int = 1
) -> np.ndarray:
    """cv2.optflow DualTVL1 of one float32 (H, W) pair on the 0..255 scale -> (H, W, 2).

    Runs with `threads` OpenCV threads (1 inside worker processes, one process per core).
    """
    import cv2

    cv2.setNumThreads(threads)
    tvl1 = cv2.optflow.DualTVL1OpticalFlow_create(
        tau=params.tau,
        lambda_=params.lambda_,
        theta=params.theta,
        nscales=params.nscales,
        warps=params.warps,
        epsilon=params.epsilon,
        innnerIterations=params.inner_iterations,
        outerIterations=params.outer_iterations,
        scaleStep=params.scale_step,
        gamma=params.gamma,
        medianFiltering=params.median_filtering,
    )
    # OpenCV scales float input by 255; hand it 0..1 so both backends see the same 0..255 image.
    return tvl1.calc(prev / 255.0, nxt / 255.0, None)


def _flow_opencv(prev: np.ndarray, nxt: np.ndarray, params: TVL1Params, jobs: int) -> np.ndarray:
    """OpenCV TV-L1 of (N, H, W) pairs: inline for one pair, else one process per core (joblib)."""
    if len(prev) == 1:
        return opencv_tvl1(prev[0], nxt[0], params, threads=max(1, jobs))[None]
    from joblib import Parallel, delayed

    from flowprep.workers import die_with_parent

    flows = Parallel(
        n_jobs=min(jobs, len(prev)), initializer=die_with_parent, initargs=(os.getpid(),)
    )(delayed(opencv_tvl1)(a, b, params) for a, b in zip(prev, nxt, strict=True))
    return np.stack(flows)


def compute_flow(
    prev: np.ndarray,
    nxt: np.ndarray,
    *,
    backend: str = "torch",
    device: str = "auto",
    jobs: int | None = None,
    compile: bool | str = False,
    **params: Any,
) -> np.ndarray:
    """TV-L1 flow from `prev` to `nxt` ((H, W) or (N, H, W), uint8 or float 0..1) in pixels.

    Returns float32 (..., H, W, 2), [..., 0] = x, with prev(x, y) ≈ nxt(x + u, y + v). `params` are
    OpenCV's DualTVL1 ones (tau, lambda_ or lambda, theta, nscales, warps, epsilon,
    inner_iterations, outer_iterations, scale_step, median_filtering, gamma) with its defaults;
    gamma > 0 (OpenCV's illumination term) is only available with the opencv backend.
    The torch backend runs on `device` (auto: CUDA if present), eagerly unless `compile` (True,
    or "auto": from 160x120 frames up; worth it for long jobs only, as the first call of each
    frame size compiles for seconds, cached on disk; falls back to eager, warning once, where
    torch.compile cannot run); the opencv backend runs `jobs` processes (default: one per core).
    On the CPU, eager torch flow of several pairs runs a pair per core, each in a thread of its
    own; one pair, or compiled flow, runs on all cores in the calling thread.
    """
    if backend not in BACKENDS:
        raise ValueError(f"flow backend must be one of {BACKENDS}, got {backend!r}")
    config = make_params(**params)
    if backend == "torch":
        check_torch_params(config)
    a, b, single = _as_batch(prev, nxt)
    if backend == "torch":
        flow = _flow_torch(a, b, device, config, wants_compile(compile, *a.shape[1:]))
    else:
        flow = _flow_opencv(a, b, config, jobs or os.cpu_count() or 1)
    flow = flow.astype(np.float32, copy=False)
    return flow[0] if single else flow
