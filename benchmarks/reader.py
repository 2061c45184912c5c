"""Reader throughput: motion (10 flow pairs) and appearance samples, frame folders vs HDF5 shards.

First times one 256x340 q95 JPEG decode with PIL, cv2 and simplejpeg (how the reader's decoder
was picked); then writes a synthetic corpus in the `flowprep extract` layout (256x340 JPEGs,
meta.json with each file's CRC32), packs it, and times samples/s through a DataLoader with 0 and 2
workers. Last, what the reader's per-frame CRC32 check costs: zlib.crc32 of one JPEG against its
decode, and samples/s with the check on and off (`flowprep.reader.CHECK_CRC`), 0 workers.
Run: python benchmarks/reader.py [--cold]   (about a minute and a half on 2 cores)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import flowprep.reader
from flowprep.layout import CHECKSUMS
from flowprep.reader import decode_jpeg, open_reader
from flowprep.shards import pack


def write_corpus(root: Path, videos: int, frames: int, seed: int = 0) -> None:
    """Synthetic frame folders: smooth textured RGB (q95) and flow (q95) JPEGs, 256x340, and
    meta.json with each file's CRC32, as `flowprep extract` writes it."""
    rng = np.random.default_rng(seed)
    q = [cv2.IMWRITE_JPEG_QUALITY, 95]
    for v in range(videos):
        folder = root / f"c{v % 4}" / f"v_{v:03d}"
        folder.mkdir(parents=True)
        base = cv2.GaussianBlur(rng.integers(0, 256, (256, 400, 3), np.uint8), (9, 9), 0)
        images = {}
        for i in range(frames):
            images[f"img_{i + 1:05d}.jpg"] = base[:, i : i + 340]
            if i < frames - 1:
                for axis, name in ((0, "flow_x"), (1, "flow_y")):
                    images[f"{name}_{i + 1:05d}.jpg"] = base[:, i : i + 340, axis] // 4 + 96
        crcs = {}
        for name, image in images.items():
            data = cv2.imencode(".jpg", image, q)[1].tobytes()
            (folder / name).write_bytes(data)
            crcs[name] = zlib.crc32(data)
        meta = {"video_id": f"c{v % 4}/v_{v:03d}", "label_index": v % 4, "num_frames": frames}
        meta.update(num_flows=frames - 1, width=340, height=256, index_base=1, flow_bound=20.0)
        meta[CHECKSUMS] = crcs
        (folder / "meta.json").write_text(json.dumps(meta))
        (folder / ".done").write_text("{}")


class Samples(Dataset):
    """Random samples: motion = 10 stacked flow pairs, appearance = 1 RGB frame; 224² crop."""

    def __init__(self, root: Path, kind: str, n: int):
        self.reader, self.kind, self.n = open_reader(root), kind, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        rng = np.random.default_rng(i)
        video = self.reader[self.reader.video_ids[i % len(self.reader)]]
        y, x = rng.integers(0, 256 - 224 + 1), rng.integers(0, 340 - 224 + 1)
        if self.kind == "motion":
            start = int(rng.integers(0, video.num_flows - 10 + 1))
            data = video.flow(range(start, start + 10))
        else:
            data = video.rgb([int(rng.integers(0, video.num_frames))])
        return torch.from_numpy(np.ascontiguousarray(data[:, y : y + 224, x : x + 224]))


def decoder_rates(repeats: int = 300) -> dict[str, tuple[float, float]]:
    """Frames/s (RGB, gray) for one 256x340 q95 JPEG, one thread, per available decoder."""
    from PIL import Image

    rng = np.random.default_rng(0)
    bgr = cv2.GaussianBlur(rng.integers(0, 256, (256, 340, 3), np.uint8), (9, 9), 0)
    q = [cv2.IMWRITE_JPEG_QUALITY, 95]
    rgb_jpeg = cv2.imencode(".jpg", bgr, q)[1].tobytes()
    gray_jpeg = cv2.imencode(".jpg", bgr[..., 0], q)[1].tobytes()

    def pil(data: bytes, gray: bool) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("L" if gray else "RGB"))

    def cv(data: bytes, gray: bool) -> np.ndarray:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), 0 if gray else 1)
        return image if gray else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    decoders = {"PIL": pil, "cv2": cv}
    try:
        import simplejpeg

        decoders["simplejpeg"] = lambda data, gray: simplejpeg.decode_jpeg(
            data, colorspace="GRAY" if gray else "RGB"
        )
    except ImportError:
        pass
    rates = {}
    for name, decode in decoders.items():
        pair = []
        for data, gray in ((rgb_jpeg, False), (gray_jpeg, True)):
            best = 0.0
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(repeats):
                    decode(data, gray)
                best = max(best, repeats / (time.perf_counter() - t0))
            pair.append(best)
        rates[name] = (pair[0], pair[1])
    return rates


def crc_cost(repeats: int = 2000) -> list[tuple[str, int, float, float]]:
    """(kind, JPEG bytes, µs per zlib.crc32, µs per decode_jpeg) for one 256x340 q95 JPEG."""
    rng = np.random.default_rng(0)
    bgr = cv2.GaussianBlur(rng.integers(0, 256, (256, 340, 3), np.uint8), (9, 9), 0)
    rows = []
    for kind, image, gray in (("RGB", bgr, False), ("gray", bgr[..., 0], True)):
        data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
        best = {"crc": float("inf"), "decode": float("inf")}
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(repeats):
                zlib.crc32(data)
            t1 = time.perf_counter()
            for _ in range(repeats):
                decode_jpeg(data, gray=gray, where="")
            t2 = time.perf_counter()
            best["crc"] = min(best["crc"], (t1 - t0) / repeats * 1e6)
            best["decode"] = min(best["decode"], (t2 - t1) / repeats * 1e6)
        rows.append((kind, len(data), best["crc"], best["decode"]))
    return rows


def crc_rates(root: Path, kind: str, n: int, args) -> tuple[float, float]:
    """Best samples/s of `root` (0 workers) with the CRC check on and off, alternating passes."""
    best = {True: 0.0, False: 0.0}
    try:
        for _ in range(args.passes):
            for check in (True, False):
                flowprep.reader.CHECK_CRC = check
                best[check] = max(best[check], rate(root, kind, 0, n, args.cold))
    finally:
        flowprep.reader.CHECK_CRC = True
    return best[True], best[False]


def evict(root: Path) -> None:
    """Drop this corpus's pages from the page cache (only our files): a cold-cache read."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def rate(root: Path, kind: str, workers: int, n: int, cold: bool) -> float:
    """Samples per second through a DataLoader (batch 8), one pass."""
    if cold:
        evict(root)
    loader = DataLoader(Samples(root, kind, n), batch_size=8, num_workers=workers)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return n / (time.perf_counter() - t0)


def compare(roots: tuple[Path, Path], kind: str, workers: int, n: int, args) -> list[float]:
    """Best samples/s of each root over `args.passes` alternating passes (A B A B ...), so that
    load from other processes on a shared machine falls on both sides alike."""
    best = [0.0, 0.0]
    for _ in range(args.passes):
        for side, root in enumerate(roots):
            best[side] = max(best[side], rate(root, kind, workers, n, args.cold))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--samples", type=int, default=160)
    parser.add_argument("--cold", action="store_true", help="evict the corpus before each pass")
    parser.add_argument("--cv2", action="store_true", help="read with the cv2 fallback decoder")
    parser.add_argument("--passes", type=int, default=3, help="alternating passes per cell")
    args = parser.parse_args()
    if args.cv2:
        flowprep.reader.simplejpeg = None  # DataLoader workers fork and inherit this
    decoder = "simplejpeg" if flowprep.reader.simplejpeg is not None else "cv2 (fallback)"
    cv2.setNumThreads(1)
    print("| decoder | RGB frames/s | gray frames/s |")
    print("| --- | --- | --- |")
    for name, (rgb, gray) in decoder_rates().items():
        print(f"| {name} | {rgb:,.0f} | {gray:,.0f} |")
    with tempfile.TemporaryDirectory() as tmp:
        folders, shards = Path(tmp) / "frames", Path(tmp) / "shards"
        write_corpus(folders, args.videos, args.frames)
        pack(folders, shards, shard_size=10**9)
        cache = "cold" if args.cold else "warm"
        load = os.getloadavg()[0]
        print(f"reader decoder: {decoder}; {args.videos} videos x {args.frames} frames")
        print(f"{cache} cache; {os.cpu_count()} cores, load average {load:.1f} before the runs")
        print("| sample | workers | folders | shards | ratio |")
        print("| --- | --- | --- | --- | --- |")
        for kind in ("motion", "appearance"):
            n = args.samples if kind == "motion" else args.samples * 4
            for workers in (0, 2):
                f, s = compare((folders, shards), kind, workers, n, args)
                print(f"| {kind} | {workers} | {f:.0f}/s | {s:.0f}/s | {s / f:.2f}x |")
        print("per-frame CRC32 check: one JPEG, 1 thread")
        print("| JPEG | bytes | zlib.crc32 | decode | crc / decode |")
        print("| --- | --- | --- | --- | --- |")
        for name, size, crc, decode in crc_cost():
            print(f"| {name} | {size:,} | {crc:.1f} µs | {decode:.0f} µs | {crc / decode:.1%} |")
        print("samples/s with the check on and off, 0 workers")
        print("| sample | corpus | CRC check on | off | on / off |")
        print("| --- | --- | --- | --- | --- |")
        for kind in ("motion", "appearance"):
            n = args.samples if kind == "motion" else args.samples * 4
            for name, root in (("folders", folders), ("shards", shards)):
                on, off = crc_rates(root, kind, n, args)
                print(f"| {kind} | {name} | {on:.0f}/s | {off:.0f}/s | {on / off:.3f}x |")


if __name__ == "__main__":
    main()
