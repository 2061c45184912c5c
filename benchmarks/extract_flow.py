"""End-to-end flow extraction: `flowprep extract --modality flow` vs a denseflow-style OpenCV loop.

The peer is what mmaction2's build_rawframes (CPU TV-L1) and denseflow do per video: decode with
cv2.VideoCapture, resize to short side 256, gray, cv2.optflow DualTVL1 per pair, clip to +-20,
quantize, imwrite flow_x/flow_y JPEGs; one process per core, a video each. Ours runs decoding
threads feeding the flow device thread, with torch.compile auto (the default) and off, and with
the opencv backend. All on the same clips (the first --frames frames of each sample video, cut
to lossless copies), in one run. Run by hand: python benchmarks/extract_flow.py [--frames 40]

`--busy-machine` times `flowprep extract --modality flow -j 2` instead, torch backend (default
settings) and opencv backend, each as a process of its own: on a quiet machine, then with
`--busy` busy-loop processes (`while True: pass`) beside it, started and always stopped here.
Rows give wall time and CPU time (user + system, the run and its worker processes).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import av
import cv2
import numpy as np
from joblib import Parallel, delayed

from flowprep.decode import output_size
from flowprep.extract import run_batch
from flowprep.manifest import build_manifest
from flowprep.settings import ExtractSettings, RuntimeOptions
from pipelines.synthetic import write_video

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "videos"
BOUND = 20.0


def cut_clips(out: Path, frames: int) -> Path:
    """Lossless (ffv1) copies of the first `frames` frames of each sample clip."""
    for video in sorted(SAMPLES.glob("*.avi")):
        if "bugy" in video.name:
            continue
        with av.open(str(video)) as container:
            rgb = []
            for frame in container.decode(video=0):
                rgb.append(frame.to_ndarray(format="rgb24"))
                if len(rgb) == frames:
                    break
        write_video(out / f"{video.stem}.mkv", np.stack(rgb), codec="ffv1")
    return out


def opencv_video(video: Path, out: Path) -> int:
    """One video the denseflow way: VideoCapture, resize, gray, DualTVL1, quantize, imwrite."""
    cv2.setNumThreads(1)
    tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()
    out.mkdir(parents=True)
    cap = cv2.VideoCapture(str(video))
    prev, pairs = None, 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        size = output_size(frame.shape[1], frame.shape[0], 256)
        gray = cv2.cvtColor(
            cv2.resize(frame, size, interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2GRAY
        )
        if prev is not None:
            flow = tvl1.calc(prev, gray, None)
            q = np.rint(255 * (np.clip(flow, -BOUND, BOUND) + BOUND) / (2 * BOUND)).astype(np.uint8)
            pairs += 1
            for c, axis in enumerate("xy"):
                cv2.imwrite(str(out / f"flow_{axis}_{pairs:05d}.jpg"), q[..., c])
        prev = gray
    return pairs


def av_size(video: Path) -> tuple[int, int]:
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        return stream.width, stream.height


@contextmanager
def busy_loops(count: int) -> Iterator[None]:
    """`count` processes spinning in `while True: pass` while the block runs; always stopped."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        time.sleep(0.5)  # let them take their cores
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def timed_extract(
    clips: Path, out: Path, extra: list[str], jobs: int, env: dict[str, str]
) -> tuple[float, float]:
    """(wall s, CPU s) of one `flowprep extract --modality flow` process and its workers."""
    cmd = [sys.executable, "-m", "flowprep", "extract", str(clips), "-o", str(out), "-q"]
    cmd += ["--modality", "flow", "-j", str(jobs), *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **env})
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def busy_machine(args: argparse.Namespace) -> None:
    """Quiet and busy rows of flowprep extract, torch (default settings) and opencv backends."""
    cases: list[tuple[str, list[str], dict[str, str]]] = [
        ("torch (default)", [], {}),
        ("opencv", ["--flow-backend", "opencv"], {}),
    ]
    if args.spin_default:  # the torch backend before the fix: libgomp's default spin count
        cases.insert(1, ("torch, GOMP_SPINCOUNT=300000", [], {"GOMP_SPINCOUNT": "300000"}))
    with tempfile.TemporaryDirectory() as tmp:
        clips = cut_clips(Path(tmp) / "clips", args.frames)
        widths = sorted({output_size(*av_size(v), 256)[0] for v in clips.glob("*.mkv")})
        warm = (
            "import numpy as np; from flowprep.flow import compute_flow\n"
            f"for w in {widths}:\n"
            "    f = np.zeros((256, w), np.uint8); compute_flow(f, f, device='cpu', compile=True)"
        )
        subprocess.run([sys.executable, "-c", warm], check=True)  # fill the compile cache
        rows, pairs = [], None
        for busy in (0, args.busy):
            for label, extra, env in cases:
                out = Path(tmp) / f"out-{len(rows)}"
                with busy_loops(busy):
                    wall, cpu = timed_extract(clips, out, extra, args.jobs, env)
                n = len(list(out.glob("*/flow_x_*.jpg")))
                assert pairs in (None, n), (pairs, n)
                pairs = n
                rows.append((label, busy, wall, cpu))
                print(f"{label:30s} busy={busy}: wall {wall:6.1f} s, CPU {cpu:6.1f} s", flush=True)
    print(f"\n{pairs} pairs, -j {args.jobs}, {os.cpu_count()} cores")
    print("| backend | busy loops | wall | CPU (user+sys) | pairs/s | speed vs opencv, same load |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, busy, wall, cpu in rows:
        opencv = next(w for lab, b, w, _ in rows if lab == "opencv" and b == busy)
        print(
            f"| {label} | {busy} | {wall:.1f} s | {cpu:.1f} s | {pairs / wall:.2f} | "
            f"{opencv / wall:.2f}× |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=40, help="frames cut from each clip")
    parser.add_argument("--copies", type=int, default=2, help="copies of each clip (videos)")
    parser.add_argument("--device", default="auto", help="flow device: auto (a GPU if any) | cpu")
    parser.add_argument(
        "--busy-machine", action="store_true", help="quiet vs busy rows of flowprep extract"
    )
    parser.add_argument("--busy", type=int, default=2, help="busy-loop processes (--busy-machine)")
    parser.add_argument(
        "--jobs", type=int, default=2, help="-j of flowprep extract (--busy-machine)"
    )
    parser.add_argument(
        "--spin-default",
        action="store_true",
        help="--busy-machine: also time torch with libgomp's default spin count (before the fix)",
    )
    args = parser.parse_args()
    if args.busy_machine:
        busy_machine(args)
        return
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        clips = cut_clips(Path(tmp) / "clips", args.frames)
        for i in range(1, args.copies):
            for clip in list(clips.glob("*.mkv")):
                if "_copy" not in clip.stem:
                    (clips / f"{clip.stem}_copy{i}.mkv").write_bytes(clip.read_bytes())
        videos = sorted(clips.glob("*.mkv"))
        entries = build_manifest(clips)
        settings = ExtractSettings(modality="flow")

        start = time.perf_counter()
        pairs = sum(
            Parallel(n_jobs=cores)(
                delayed(opencv_video)(v, Path(tmp) / "peer" / v.stem) for v in videos
            )
        )
        peer = pairs / (time.perf_counter() - start)
        print(f"{len(videos)} videos, {pairs} pairs at short side 256, {cores} cores")
        print(f"denseflow-style OpenCV loop, {cores} processes: {peer:6.2f} pairs/s  1.00x")

        # Compile (or load from the disk cache) both frame sizes in another process: torch work
        # in this main thread would slow the flow device thread (see BENCHMARKS.md, libgomp).
        widths = sorted({output_size(*av_size(v), 256)[0] for v in videos})
        warm = (
            "import numpy as np; from flowprep.flow import compute_flow\n"
            f"for w in {widths}:\n"
            f"    f = np.zeros((256, w), np.uint8); compute_flow(f, f, device={args.device!r}, "
            "compile=True)"
        )
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", warm], check=True)
        print(f"torch.compile warm-up (not in the rates): {time.perf_counter() - start:.1f} s")

        torch_options = RuntimeOptions(device=args.device)
        opencv = ExtractSettings(modality="flow", flow_backend="opencv")
        runs = [
            ("flowprep, torch, compile auto", settings, torch_options),
            ("flowprep, torch, compile off", settings, replace(torch_options, flow_compile=False)),
            ("flowprep, opencv backend", opencv, RuntimeOptions()),
        ]
        for label, s, options in runs:
            out = Path(tmp) / label.replace(" ", "_").replace(",", "")
            start = time.perf_counter()
            results = run_batch(entries, clips, out, s, options=options, jobs=cores)
            rate = pairs / (time.perf_counter() - start)
            assert all(r.status == "done" for r in results), results
            print(f"{label:30s}: {rate:6.2f} pairs/s  {rate / peer:.2f}x")


if __name__ == "__main__":
    main()
