"""Writing one video's frames into a folder: RGB JPEGs, flow pairs (quantized JPEG or npy), CRCs.

Decoding feeds `write_frames`; flow chunks go to a FlowService or are computed in place; every
file's CRC32 is collected for meta.json.
"""

from __future__ import annotations

import io
import zlib
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from flowprep.decode import DecodeStats, VideoError, iter_frames
from flowprep.layout import CHECKSUMS, frame_name
from flowprep.settings import ExtractSettings, RuntimeOptions

if TYPE_CHECKING:
    from flowprep.flow_service import FlowService
    from flowprep.ownership import Claim


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of an (H, W) gray or (H, W, 3) RGB uint8 image.

    OpenCV's libjpeg is deterministic, which the byte-identical resume relies on.
    """
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise VideoError(f"JPEG encoding failed for a {image.shape} frame")
    return buf.tobytes()


def write_frame_file(folder: Path, name: str, data: bytes, checksums: dict[str, int]) -> None:
    """Write one frame file and note its CRC32 in `checksums` (meta.json's CHECKSUMS).

    The reader and `verify` compare each file they read with it, so a flipped bit that still
    decodes is found; `pack` checks it too before copying the bytes into a shard.
    """
    (folder / name).write_bytes(data)
    checksums[name] = zlib.crc32(data)


class FlowWriter:
    """Batch consecutive grayscale frames into pairs and write flow k (frame k -> frame k+1).

    Chunks are always pairs [k*B, (k+1)*B) of one video, whichever device computes them, so the
    output does not depend on timing. Up to MAX_INFLIGHT chunks are computed while decoding goes
    on; only `flow_batch` + 1 frames per chunk are held, so long videos stream in bounded memory.
    """

    MAX_INFLIGHT = 2

    def __init__(
        self,
        folder: Path,
        settings: ExtractSettings,
        options: RuntimeOptions,
        service: FlowService | None = None,
        checksums: dict[str, int] | None = None,
    ):
        from flowprep.quantize import quantize_flow  # flow pulls in torch: import only when needed

        self.folder, self.settings, self.options = folder, settings, options
        self.checksums = {} if checksums is None else checksums
        self._quantize = quantize_flow
        self._submit = service.submit if service is not None else self._compute_here
        self.pending: list[np.ndarray] = []
        self.inflight: deque[Future] = deque()
        self.written = 0

    def _compute_here(self, prev: np.ndarray, nxt: np.ndarray) -> Future:
        from flowprep.flow import compute_flow

        future: Future = Future()
        flow = compute_flow(
            prev,
            nxt,
            backend=self.settings.flow_backend,
            device=self.options.device,
            compile=self.options.flow_compile,
        )
        future.set_result(np.asarray(flow, dtype=np.float32))
        return future

    def add(self, rgb: np.ndarray) -> None:
        self.pending.append(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        if len(self.pending) > self.options.flow_batch:
            self._send()

    def _send(self) -> None:
        if len(self.pending) >= 2:
            frames = np.stack(self.pending)
            self.inflight.append(self._submit(frames[:-1], frames[1:]))
            self.pending = self.pending[-1:]
        while len(self.inflight) > self.MAX_INFLIGHT:
            self._write_chunk(self.inflight.popleft().result())

    def finish(self) -> None:
        """Send the last partial chunk and write every outstanding one, in order."""
        self._send()
        while self.inflight:
            self._write_chunk(self.inflight.popleft().result())

    def _write_chunk(self, flow: np.ndarray) -> None:
        for pair in flow:
            self._write(pair)

    def _write(self, pair: np.ndarray) -> None:
        s = self.settings
        if s.flow_format == "npy":
            buf = io.BytesIO()
            np.save(buf, pair)
            name = frame_name("flow", self.written)
            write_frame_file(self.folder, name, buf.getvalue(), self.checksums)
        else:
            q = self._quantize(pair, s.flow_bound)
            for channel, kind in enumerate(("flow_x", "flow_y")):
                data = encode_jpeg(np.ascontiguousarray(q[..., channel]), s.jpeg_quality)
                name = frame_name(kind, self.written)
                write_frame_file(self.folder, name, data, self.checksums)
        self.written += 1


def write_frames(
    source: Path,
    folder: Path,
    settings: ExtractSettings,
    options: RuntimeOptions,
    service: FlowService | None,
    claim: Claim | None = None,
) -> dict:
    """Decode `source` into `folder`; return the counts, sizes, rotation and CRCs for meta.json."""
    checksums: dict[str, int] = {}
    flow = (
        FlowWriter(folder, settings, options, service, checksums) if settings.wants_flow else None
    )
    count, shape, stats = 0, (0, 0), DecodeStats()
    frames = iter_frames(
        source, short_side=settings.short_side, threads=options.threads, stats=stats
    )
    for rgb in frames:
        if claim is not None:
            claim.check()
        if settings.wants_rgb:
            data = encode_jpeg(rgb, settings.jpeg_quality)
            write_frame_file(folder, frame_name("img", count), data, checksums)
        if flow is not None:
            flow.add(rgb)
        shape = rgb.shape[:2]
        count += 1
    if flow is not None:
        flow.finish()
    return {
        "num_frames": count,
        "height": shape[0],
        "width": shape[1],
        "num_flows": flow.written if flow else 0,
        "rotation": stats.rotation,  # degrees clockwise the decoded frames were turned upright
        CHECKSUMS: checksums,
    }
