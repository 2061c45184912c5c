"""RGB extraction throughput: flowprep extract vs an OpenCV VideoCapture/imwrite loop.

The OpenCV loop is what mmaction2's build_rawframes (RGB-only mode) and denseflow do per video:
read with cv2.VideoCapture, resize, imwrite. Both run on the same clips in this process, one
video at a time, and the ratio is printed. Run by hand: python benchmarks/extract.py [--repeat N]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import cv2

from flowprep.decode import output_size
from flowprep.extract import run_batch
from flowprep.manifest import build_manifest
from flowprep.settings import ExtractSettings

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "videos"


def opencv_loop(videos: list[Path], out: Path, short_side: int = 256) -> int:
    """Extract every frame with cv2 only; return the number of frames written."""
    total = 0
    for video in videos:
        folder = out / video.stem
        folder.mkdir(parents=True)
        cap = cv2.VideoCapture(str(video))
        index = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            size = output_size(frame.shape[1], frame.shape[0], short_side)
            frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
            index += 1
            cv2.imwrite(str(folder / f"img_{index:05d}.jpg"), frame, [cv2.IMWRITE_JPEG_QUALITY, 95])
        total += index
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=Path, default=SAMPLES)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    entries = build_manifest(args.videos)
    videos = [args.videos / e.path for e in entries]
    ours, peer = [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            results = run_batch(entries, args.videos, Path(tmp) / "ours", ExtractSettings())
            frames = sum(r.num_frames for r in results)
            ours.append(frames / (time.perf_counter() - start))
            start = time.perf_counter()
            peer_frames = opencv_loop(videos, Path(tmp) / "cv2")
            peer.append(peer_frames / (time.perf_counter() - start))
            shutil.rmtree(tmp, ignore_errors=True)
    best_ours, best_peer = max(ours), max(peer)
    print(f"clips: {len(videos)} from {args.videos}, {frames} frames (cv2 read {peer_frames})")
    print(f"flowprep extract (1 job): {best_ours:8.1f} frames/s")
    print(f"cv2 VideoCapture loop   : {best_peer:8.1f} frames/s")
    print(f"ratio flowprep / cv2    : {best_ours / best_peer:8.2f}x")


if __name__ == "__main__":
    main()
