"""`strnet predict`: top-k classes of raw videos, flow computed in memory, scored as `strnet eval`.

Each video goes through what `flowprep extract` and then `strnet eval` do to it, without frame
folders in between:

1. decoded by `flowprep.decode.iter_frames` at extract's short side;
2. the RGB frames the test protocol samples are JPEG-encoded as extract writes them and decoded
   as `flowprep.reader` reads them, so the network sees the pixels it was trained on;
3. the flow of the frame pairs the protocol samples (only those) comes from
   `flowprep.flow.compute_flow` on the grey frames, as extract computes it, clipped and quantized
   by `flowprep.quantize.quantize_flow` and JPEG round-tripped per component (flow_x, flow_y);
4. `strnet.runtime.test_loader` and `score_videos` score it as `strnet eval` does (25 chunks and
   their flips on whole frames, or centre crops), once per checkpoint; several checkpoints are
   joined by `strnet.scores.combine` and fused by averaging before softmax (`eval --fuse`).

Extract settings (short side, JPEG quality, flow bound and backend) come from the checkpoint when
it carries them under `EXTRACT_KEY`, else from the options, whose defaults are extract's.
Decoding video n+1 (a worker thread) overlaps flow and network of video n. A video that cannot
be read fails alone with a one-line reason.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from flowprep.decode import VideoError, iter_frames
from flowprep.flow_service import DEVICE_BATCH
from flowprep.manifest import find_videos
from flowprep.reader import decode_jpeg
from flowprep.settings import ExtractSettings
from flowprep.writing import encode_jpeg
from strnet.config import ConfigError
from strnet.models import is_two_stream
from strnet.runtime import (
    PROTOCOLS,
    Trained,
    load_trained,
    score_videos,
    setup_device,
    test_loader,
)
from strnet.scores import VideoScores, combine, default_name
from strnet.weights import load_file

EXTRACT_KEY = "extract_settings"  # a checkpoint's `ExtractSettings.to_dict()` of its training data
SETTING_KEYS = ("short_side", "jpeg_quality", "flow_backend", "flow_bound")
EXIT_SOME_FAILED = 3  # as `flowprep extract`
VIDEO_ID = "video"  # the one id of the in-memory reader


# --------------------------------------------------------------------------- settings
def carried_settings(path: str | Path) -> dict | None:
    """The extract settings a checkpoint carries under `EXTRACT_KEY`, or None."""
    obj = load_file(path)
    settings = obj.get(EXTRACT_KEY) if isinstance(obj, dict) else None
    return dict(settings) if isinstance(settings, dict) and settings else None


def resolve_settings(
    carried: list[tuple[str, dict | None]],
    flags: dict[str, object],
    *,
    wants_rgb: bool,
    wants_flow: bool,
) -> tuple[ExtractSettings, list[str]]:
    """The extract settings to prepare videos with, and notes on options that override them.

    `carried` are (checkpoint, its settings or None); checkpoints that disagree are a
    ConfigError. `flags` are the options (None where not given): a given one wins over the
    checkpoints' value, with a note; unset values are extract's defaults.
    """
    merged: dict[str, object] = {}
    source: dict[str, str] = {}
    for path, settings in carried:
        if not settings:
            continue
        if settings.get("flow_format", "jpeg") != "jpeg" and wants_flow:
            raise ConfigError(
                f"'{path}' was trained on flow_format {settings['flow_format']!r}; strnet reads "
                "JPEG flow only"
            )
        for key in SETTING_KEYS:
            if key not in settings:
                continue
            if key in merged and merged[key] != settings[key]:
                raise ConfigError(
                    f"{key}: '{source[key]}' was trained on {merged[key]} but '{path}' on "
                    f"{settings[key]}; predict with them separately"
                )
            merged[key], source[key] = settings[key], path
    notes = []
    for key, value in flags.items():
        if value is None:
            continue
        if key in merged and merged[key] != value:
            notes.append(
                f"note: --{key.replace('_', '-')} {value} overrides {merged[key]} of the "
                f"extract settings '{source[key]}' was trained on"
            )
        merged[key] = value
    modality = "both" if wants_rgb and wants_flow else "flow" if wants_flow else "rgb"
    try:
        settings = ExtractSettings(
            **{k: merged[k] for k in SETTING_KEYS if k in merged}, modality=modality
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"extract settings: {exc}") from None
    return settings, notes


# --------------------------------------------------------------------------- one video
class MemoryVideo:
    """A decoded video served as `flowprep.reader` serves the frame folder extract writes of it.

    `rgb(indices)` and `flow(indices)` give what reading extract's JPEGs gives; flow k is frame
    k -> k+1. Only frames and flows asked for are prepared, once each: the test protocol reads a
    few dozen of a video's frames and flows, and which ones is `strnet.data`'s business alone.
    `flow_seconds` adds up the time spent on flow.
    """

    def __init__(
        self,
        frames: list[np.ndarray],
        settings: ExtractSettings,
        *,
        flow_device: str = "auto",
        flow_compile: bool | str = "auto",
        video_id: str = VIDEO_ID,
    ) -> None:
        self.frames = frames
        self.settings, self.video_id = settings, video_id
        self.flow_device, self.flow_compile = flow_device, flow_compile
        self.num_frames = len(frames)
        self.num_flows = self.num_frames - 1 if settings.wants_flow else 0
        height, width = frames[0].shape[:2]
        self.meta = {"video_id": video_id, "num_frames": self.num_frames,
                     "num_flows": self.num_flows, "height": height, "width": width}  # fmt: skip
        self._rgb: dict[int, np.ndarray] = {}
        self._flow: dict[int, np.ndarray] = {}
        self.flow_seconds = 0.0

    def prepare_rgb(self, indices) -> None:
        """JPEG round trip of frames `indices`: extract's encoding, the reader's decoding."""
        q = self.settings.jpeg_quality
        for i in sorted({int(i) for i in indices} - self._rgb.keys()):
            data = encode_jpeg(self.frames[i], q)
            self._rgb[i] = decode_jpeg(data, gray=False, where=f"{self.video_id} frame {i}")

    def prepare_flow(self, indices) -> None:
        """Flows `indices` as extract stores them: TV-L1, clipped, quantized, JPEG round trip.

        Pairs go to `compute_flow` in batches of up to extract's device batch; a pair's flow does
        not depend on its batch mates (extract joins pairs of several videos the same way).
        """
        from flowprep.flow import compute_flow
        from flowprep.quantize import quantize_flow

        s, frames, started = self.settings, self.frames, time.perf_counter()
        todo = sorted({int(i) for i in indices} - self._flow.keys())
        for start in range(0, len(todo), DEVICE_BATCH):
            part = todo[start : start + DEVICE_BATCH]
            grey = {k: cv2.cvtColor(frames[k], cv2.COLOR_RGB2GRAY) for k in part}
            grey.update({k + 1: cv2.cvtColor(frames[k + 1], cv2.COLOR_RGB2GRAY) for k in part})
            flow = compute_flow(
                np.stack([grey[k] for k in part]), np.stack([grey[k + 1] for k in part]),
                backend=s.flow_backend, device=self.flow_device, compile=self.flow_compile,
            )  # fmt: skip
            quantized = quantize_flow(np.asarray(flow, dtype=np.float32), s.flow_bound)
            for k, q in zip(part, quantized, strict=True):
                components = [
                    decode_jpeg(
                        encode_jpeg(np.ascontiguousarray(q[..., c]), s.jpeg_quality),
                        gray=True,
                        where=f"{self.video_id} {kind} {k}",
                    )  # fmt: skip
                    for c, kind in enumerate(("flow_x", "flow_y"))
                ]
                self._flow[k] = np.stack(components, axis=-1)
        self.flow_seconds += time.perf_counter() - started

    def rgb(self, indices) -> np.ndarray:
        """RGB frames at 0-based `indices` as uint8 (N, H, W, 3)."""
        self.prepare_rgb(indices)
        return np.stack([self._rgb[int(i)] for i in indices])

    def flow(self, indices) -> np.ndarray:
        """Quantized flow k at 0-based `indices` as uint8 (N, H, W, 2): x, y."""
        self.prepare_flow(indices)
        return np.stack([self._flow[int(i)] for i in indices])


# --------------------------------------------------------------------------- the predictor
@dataclass
class Prediction:
    """The outcome of one video: fused scores and per-stream scores (before softmax), or why not."""

    video: str
    status: str  # done | failed
    reason: str = ""
    num_frames: int = 0  # frames decoded
    fused: np.ndarray | None = None  # (K,) float32
    streams: dict[str, np.ndarray] = field(default_factory=dict)  # (K,) each
    seconds: dict[str, float] = field(default_factory=dict)  # decode, flow, network

    def probabilities(self) -> np.ndarray:
        """Softmax of the fused scores."""
        return torch.from_numpy(self.fused).double().softmax(0).numpy()

    def top(self, classes: list[str], k: int) -> list[tuple[str, int, float]]:
        """(class name, index, probability) of the k most probable classes, best first."""
        probs = self.probabilities()
        order = np.argsort(-probs, kind="stable")[: min(k, len(probs))]
        return [(classes[i], int(i), float(probs[i])) for i in order]

    def record(self, classes: list[str], k: int) -> dict:
        """One JSON line: the video, its top-k, the scores before softmax, the timings."""
        if self.status != "done":
            return {"video": self.video, "error": self.reason}
        return {
            "video": self.video,
            "num_frames": self.num_frames,
            "top": [{"class": n, "index": i, "probability": p} for n, i, p in self.top(classes, k)],
            "fused": self.fused.tolist(),
            "scores": {name: v.tolist() for name, v in self.streams.items()},
            "seconds": {name: round(v, 6) for name, v in self.seconds.items()},
        }


@dataclass
class Decoded:
    """What the decode thread hands on: the video (or the reason it failed) and its time."""

    path: Path
    video: MemoryVideo | None
    reason: str
    seconds: float


def failure_reason(exc: BaseException) -> str:
    """One line for a video that failed: a VideoError's reason, else the type and message."""
    if isinstance(exc, VideoError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


class Predictor:
    """Checkpoints loaded once, on one device, that score videos as `strnet eval` does."""

    def __init__(
        self,
        checkpoints: list[str | Path],
        *,
        protocol: str = "paper",
        test_chunks: int = 25,
        device: str = "auto",
        flags: dict[str, object] | None = None,
        flow_compile: bool | str = "auto",
        decode_threads: int = 0,
    ) -> None:
        if not checkpoints:
            raise ConfigError("give at least one --checkpoint")
        if protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {protocol!r}; use {' or '.join(PROTOCOLS)}")
        self.protocol, self.decode_threads = protocol, decode_threads
        self.paths = [str(p) for p in checkpoints]
        self.trained: list[Trained] = [load_trained(p) for p in self.paths]
        k = self.trained[0].cfg.model.num_classes
        self.classes = self.trained[0].classes or [str(i) for i in range(k)]
        for path, t in zip(self.paths[1:], self.trained[1:], strict=True):
            names = t.classes or [str(i) for i in range(t.cfg.model.num_classes)]
            if names != self.classes:
                raise ConfigError(f"'{path}': class names differ from those of '{self.paths[0]}'")
        for t in self.trained:
            t.cfg.data.test_chunks = test_chunks
        self.ctx = setup_device(device)
        self.flow_device = self.ctx.device.type if device == "auto" else device
        self.flow_compile = flow_compile
        for t in self.trained:
            t.model.to(self.ctx.device).eval()
        wants_rgb = any(t.cfg.data.use_rgb for t in self.trained)
        wants_flow = any(t.cfg.data.use_flow for t in self.trained)
        carried = [(p, carried_settings(p)) for p in self.paths]
        self.settings, self.notes = resolve_settings(
            carried, dict(flags or {}), wants_rgb=wants_rgb, wants_flow=wants_flow
        )

    # ----------------------------------------------------------------- stages
    def decode(self, path: Path) -> Decoded:
        """Stage 1 (the decode thread): every frame, at extract's size."""
        start = time.perf_counter()
        try:
            frames = list(
                iter_frames(path, short_side=self.settings.short_side, threads=self.decode_threads)
            )
            if self.settings.wants_flow and len(frames) < 2:
                raise VideoError(
                    f"needs >= 2 frames for flow ({len(frames)} decoded, no frame pair)"
                )
            video = MemoryVideo(frames, self.settings, flow_device=self.flow_device,
                                flow_compile=self.flow_compile)  # fmt: skip
            return Decoded(path, video, "", time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - one bad video must not stop the batch
            return Decoded(path, None, failure_reason(exc), time.perf_counter() - start)

    @torch.no_grad()
    def score(self, video: MemoryVideo) -> VideoScores:
        """Stages 2 and 3: every checkpoint's streams on `video` as `strnet eval` scores a test
        video; the frames and flows its loader reads are prepared then (`MemoryVideo`)."""
        reader, items = {video.video_id: video}, [(video.video_id, 0)]
        sources = []
        for path, t in zip(self.paths, self.trained, strict=True):
            loader = test_loader(t.cfg, reader, items, protocol=self.protocol, num_workers=0)
            streams = score_videos(
                t.model, loader, two_stream=is_two_stream(t.cfg.model.name),
                device=self.ctx.device, flips=self.protocol == "paper",
            )  # fmt: skip
            scores = VideoScores([video.video_id], np.zeros(1, np.int64), self.classes, streams,
                                 self.protocol)  # fmt: skip
            sources.append((default_name(path), path, scores))
        return combine(sources)

    def finish(self, decoded: Decoded) -> Prediction:
        """Flow and network of a decoded video; a failure is the video's alone.

        `seconds`: decode (the decode thread), flow (TV-L1, quantization and flow JPEG round
        trips), network (RGB JPEG round trips, sampling, crops and the forward passes).
        """
        result = Prediction(str(decoded.path), "failed", decoded.reason)
        result.seconds["decode"] = decoded.seconds
        if decoded.video is None:
            return result
        result.num_frames = decoded.video.num_frames
        try:
            start = time.perf_counter()
            scores = self.score(decoded.video)
            total = time.perf_counter() - start
            result.seconds["flow"] = decoded.video.flow_seconds
            result.seconds["network"] = total - decoded.video.flow_seconds
        except (KeyboardInterrupt, ConfigError):
            raise
        except Exception as exc:  # noqa: BLE001 - one bad video must not stop the batch
            result.reason = failure_reason(exc)
            return result
        result.status, result.reason = "done", ""
        result.fused = scores.fused()[0]
        result.streams = {name: v[0] for name, v in scores.streams.items()}
        return result

    def run(self, paths: list[Path]) -> Iterator[Prediction]:
        """Predictions of `paths` in order; decoding video n+1 overlaps flow and network of n."""
        if not paths:
            return
        with ThreadPoolExecutor(1, thread_name_prefix="strnet-decode") as pool:
            ahead: Future = pool.submit(self.decode, paths[0])
            try:
                for n in range(len(paths)):
                    decoded = ahead.result()
                    if n + 1 < len(paths):
                        ahead = pool.submit(self.decode, paths[n + 1])
                    yield self.finish(decoded)
            finally:
                ahead.cancel()


def collect_videos(inputs: list[Path]) -> list[Path]:
    """Files as given; folders expanded to the videos under them (flowprep's extensions), sorted."""
    out: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = find_videos(item)
            if not found:
                raise ConfigError(f"{item}: no videos in this folder")
            out.extend(item / rel for rel in found)
        else:
            out.append(item)  # a missing or broken file fails as that video, not the run
    return out


def summary_line(result: Prediction, classes: list[str], k: int) -> str:
    """`VIDEO: name p, name p, ...` with the top-k probabilities."""
    top = ", ".join(f"{name} {p:.4f}" for name, _, p in result.top(classes, k))
    return f"{result.video}: {top}"


def predict(
    predictor: Predictor,
    videos: list[str | Path],
    *,
    top: int = 5,
    json_out: str | Path | None = None,
    on_result: Callable[[Prediction], None] | None = None,
) -> list[Prediction]:
    """Predict every video (files, or folders of videos), in order; `on_result` sees each.

    With `json_out`, one JSON line per video (`Prediction.record`), written as videos finish.
    """
    paths = collect_videos([Path(v) for v in videos])
    results = []
    sink = open(json_out, "w") if json_out else None  # noqa: SIM115 - written as videos finish
    try:
        for result in predictor.run(paths):
            results.append(result)
            if sink is not None:
                sink.write(json.dumps(result.record(predictor.classes, top)) + "\n")
                sink.flush()
            if on_result is not None:
                on_result(result)
    finally:
        if sink is not None:
            sink.close()
    return results
