"""Broken inputs for the tests: one file per way a video can fail, with the expected reason."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from pipelines.synthetic import moving_shapes, write_video

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_bad_videos(folder: Path) -> dict[str, str]:
    """Write broken videos into `folder`; return {file name: fragment of its failure reason}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.avi").write_bytes(b"")
    (folder / "text.avi").write_text("this is not a video\n" * 50)
    good = write_video(folder / "whole.avi", moving_shapes(60, 64, 80, seed=3))
    data = good.read_bytes()
    good.unlink()
    (folder / "truncated.avi").write_bytes(data[: len(data) // 2])
    with av.open(str(folder / "audio_only.mkv"), mode="w") as c:
        stream = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 800), np.int16), format="s16", layout="mono"
        )
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            c.mux(packet)
    with av.open(str(folder / "no_frames.avi"), mode="w") as c:  # a video stream, no packets
        stream = c.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        c.start_encoding()
    return {
        "empty.avi": "empty file (0 bytes)",
        "text.avi": "not a readable video container",
        "truncated.avi": "truncated: ",
        "audio_only.mkv": "no video stream",
        "no_frames.avi": "no decodable frames",
        "missing.avi": "file not found",
    }
