"""End-to-end flow extraction: `flowprep extract --modality flow` vs a denseflow-style OpenCV loop.

The peer is what mmaction2's build_rawframes (CPU TV-L1) and denseflow do per video: decode with
cv2.VideoCapture, resize to short side 256, gray, cv2.optflow DualTVL1 per pair, clip to +-20,
quantize, imwrite flow_x/flow_y JPEGs; one process per core, a video each. Ours runs decoding
threads feeding the flow device thread, with torch.compile auto (the default) and off, and with
the opencv backend. All on the same clips (the first --frames frames of each sample video, cut
to lossless copies), in one run. Run by hand: python benchmarks/extract_flow.py [--frames 40]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import av
import cv2
import numpy as np
from joblib import Parallel, delayed

from flowprep.decode import output_size
from flowprep.extract import ExtractSettings, RuntimeOptions, run_batch
from flowprep.manifest import build_manifest
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=40, help="frames cut from each clip")
    parser.add_argument("--copies", type=int, default=2, help="copies of each clip (videos)")
    parser.add_argument("--device", default="auto", help="flow device: auto (a GPU if any) | cpu")
    args = parser.parse_args()
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
