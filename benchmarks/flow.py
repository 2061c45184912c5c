"""TV-L1 throughput and accuracy: torch backend (eager, compiled, CUDA) vs OpenCV's DualTVL1.

All at 341x256 (the papers' frame size) with OpenCV's default parameters, in one run, on frame
pairs of the sample clips; OpenCV runs one process per core (cv2 1 thread each). Prints pairs/s,
the ratio to OpenCV, EPE against known warps of real frames, and the mean disagreement between
torch and OpenCV on real consecutive frames. Run by hand:
    python benchmarks/flow.py [--pairs 16] [--batches 1,8,16] [--repeat 3] [--no-compile]
                              [--median-only]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import av
import cv2
import numpy as np
import torch

from flowprep.flow import compute_flow

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SIZE = (341, 256)


def clip_frames(name: str, start: int, count: int) -> np.ndarray:
    """`count` consecutive grayscale frames of a sample clip, resized to 341x256."""
    frames = []
    with av.open(str(SAMPLES / "videos" / name)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i >= start:
                gray = frame.to_ndarray(format="gray")
                frames.append(cv2.resize(gray, SIZE, interpolation=cv2.INTER_AREA))
            if len(frames) == count:
                break
    return np.stack(frames)


def real_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n consecutive-frame pairs, half from tree.avi, half from Megamind.avi."""
    a = clip_frames("tree.avi", 20, n // 2 + 1)
    b = clip_frames("Megamind.avi", 20, n - n // 2 + 1)
    prev = np.concatenate((a[:-1], b[:-1]))
    nxt = np.concatenate((a[1:], b[1:]))
    return prev, nxt


def known_warps() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, prev, nxt, ground-truth flow) with prev(x) = nxt(x + flow): real frames, warped."""
    w, h = SIZE
    y, x = np.mgrid[:h, :w].astype(np.float32)
    cx, cy, ang, zoom = (w - 1) / 2, (h - 1) / 2, np.deg2rad(2.0), 1.03
    rot = np.stack(
        (
            zoom * (np.cos(ang) * (x - cx) - np.sin(ang) * (y - cy)) - (x - cx),
            zoom * (np.sin(ang) * (x - cx) + np.cos(ang) * (y - cy)) - (y - cy),
        ),
        axis=-1,
    ).astype(np.float32)
    trans = np.stack((np.full_like(x, 3.4), np.full_like(x, -2.2)), axis=-1)
    sources = {
        "rubberwhale": cv2.imread(str(SAMPLES / "frames" / "rubberwhale1.png"), 0),
        "basketball": cv2.imread(str(SAMPLES / "frames" / "basketball1.png"), 0),
        "tree.avi": clip_frames("tree.avi", 40, 1)[0],
    }
    cases = []
    for name, img in sources.items():
        nxt = cv2.resize(img, SIZE, interpolation=cv2.INTER_AREA)
        for kind, gt in (("translation", trans), ("rotation+zoom", rot)):
            prev = cv2.remap(
                nxt.astype(np.float32), x + gt[..., 0], y + gt[..., 1], cv2.INTER_CUBIC
            )
            prev = np.clip(np.rint(prev), 0, 255).astype(np.uint8)
            cases.append((f"{name} {kind}", prev, nxt, gt))
    return cases


def epe(a: np.ndarray, b: np.ndarray, margin: int = 16) -> float:
    d = np.linalg.norm(a - b, axis=-1)
    return float(d[..., margin:-margin, margin:-margin].mean())


def timed(fn, repeat: int = 1) -> float:
    """Best wall time of `repeat` calls."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def time_medians(repeat: int = 5) -> None:
    """ms per 5x5 median of 2 pairs' flow (2 x 2 planes of 341x256) on each device at hand."""
    import torch.nn.functional as F

    from flowprep.tvl1 import compiled_median, median_blur, median_comparators

    median_comparators(25)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        u = torch.rand(2, 2, SIZE[1], SIZE[0], device=device)
        padded = F.pad(u, (2, 2, 2, 2), mode="replicate")
        ways = {
            "compiled min/max network": lambda p=padded: compiled_median()(p, 5),
            "unfold + median": lambda u=u: median_blur(u.double(), 5),
        }
        if device == "cpu":
            ways["cv2.medianBlur"] = lambda u=u: median_blur(u, 5)
        for name, fn in ways.items():
            fn()  # compile / warm up
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(repeat):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t) / repeat * 1e3
            print(f"median {device:4s} {name:26s}: {ms:7.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16, help="frame pairs per measurement")
    parser.add_argument("--batches", default="1,8,16", help="torch batch sizes")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--cuda-batches", default="1,16,64,256", help="CUDA batch sizes")
    parser.add_argument("--median-only", action="store_true", help="only time the 5x5 medians")
    parser.add_argument(
        "--repeat", type=int, default=3, help="timings per row, best kept (a shared machine)"
    )
    args = parser.parse_args()
    if args.median_only:
        time_medians()
        return
    batches = [int(b) for b in args.batches.split(",")]
    cores = os.cpu_count() or 1
    print(f"torch {torch.__version__}, cv2 {cv2.__version__}, {cores} cores, "
          f"{torch.get_num_threads()} torch threads, {SIZE[0]}x{SIZE[1]}")  # fmt: skip
    prev, nxt = real_pairs(args.pairs)
    n = len(prev)

    compute_flow(prev[:2], nxt[:2], backend="opencv")  # start the worker pool
    t = timed(lambda: compute_flow(prev, nxt, backend="opencv"), args.repeat)
    ref_rate = n / t
    print(f"opencv DualTVL1, {cores} processes x 1 thread: {ref_rate:.2f} pairs/s")
    ref = compute_flow(prev, nxt, backend="opencv")

    modes = [("eager", "cpu", False, batches)]
    if not args.no_compile:
        modes.append(("compiled", "cpu", True, batches))
    if torch.cuda.is_available():
        cuda_batches = [int(b) for b in args.cuda_batches.split(",")]
        modes += [("cuda eager", "cuda", False, cuda_batches)]
        if not args.no_compile:
            modes += [("cuda compiled", "cuda", True, cuda_batches)]
    results = {}
    for label, device, comp, sizes in modes:
        if comp:
            t = timed(lambda d=device: compute_flow(prev[:1], nxt[:1], device=d, compile=True))
            print(f"torch {label}: first call (compile or cache load) {t:.1f} s")
        for b in sizes:
            # every batch size solves the same pairs (pairs differ in how long they take)
            if b <= n:
                batches = [(prev[i : i + b], nxt[i : i + b]) for i in range(0, n - b + 1, b)]
            else:
                reps = -(-b // n)
                batches = [(np.concatenate([prev] * reps)[:b], np.concatenate([nxt] * reps)[:b])]

            def run(batches=batches, device=device, comp=comp):  # noqa: E306
                for p, q in batches:
                    out = compute_flow(p, q, device=device, compile=comp)
                return out

            if device == "cuda":
                run()  # warm up kernels / cudnn
            t = timed(run, args.repeat)
            rate = b * len(batches) / t
            results[(label, b)] = rate
            print(f"torch {label:13s} batch {b:3d}: {rate:7.2f} pairs/s  "
                  f"({rate / ref_rate:.2f}x opencv)")  # fmt: skip

    variants = [("eager", False)] + ([] if args.no_compile else [("compiled", True)])
    for label, comp in variants:
        ours = compute_flow(prev, nxt, device="cpu", compile=comp)
        d = np.linalg.norm(ours - ref, axis=-1)
        worst = d.mean(axis=(1, 2)).max()
        print(f"agreement torch {label} vs opencv on {n} real pairs: mean EPE {d.mean():.4f} px, "
              f"99th pct {np.percentile(d, 99):.3f} px, worst pair mean {worst:.4f}")  # fmt: skip
    print("known warps (EPE vs ground truth, 16 px border left out):")
    for name, p, q, gt in known_warps():
        r = compute_flow(p, q, backend="opencv")
        line = f"  {name:28s} opencv {epe(r, gt):.4f}"
        for label, comp in variants:
            line += f"  torch {label} {epe(compute_flow(p, q, device='cpu', compile=comp), gt):.4f}"
        print(line)


if __name__ == "__main__":
    main()
