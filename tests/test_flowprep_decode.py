"""Decoding with PyAV: sizes, frame counts on real clips, and every kind of broken input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bad_videos import SHARED, make_bad_videos

from flowprep.decode import VideoError, iter_frames, output_size, probe
from pipelines.synthetic import moving_shapes, write_video


@pytest.mark.parametrize(
    "size, expected",
    [
        ((320, 240), (341, 256)),
        ((240, 320), (256, 341)),
        ((720, 528), (349, 256)),
        ((97, 61), (407, 256)),
        ((100, 50), (100, 50)),
    ],
)
def test_output_size_short_side(size: tuple[int, int], expected: tuple[int, int]) -> None:
    short = 0 if size == (100, 50) else 256
    assert output_size(*size, short) == expected


@pytest.mark.skipif(not SHARED.exists(), reason="shared sample data not present")
@pytest.mark.parametrize(
    "name, frames, size",
    [
        ("Megamind.avi", 270, (256, 349)),
        ("Megamind_bugy.avi", 270, (256, 349)),
        ("tree.avi", 68, (256, 341)),
    ],
)
def test_real_clips_decode_every_stored_frame(name: str, frames: int, size: tuple) -> None:
    decoded = list(iter_frames(SHARED / "videos" / name))
    assert len(decoded) == frames  # tree.avi declares 444 but stores 68 (dropped-frame gaps)
    assert {f.shape for f in decoded} == {(*size, 3)} and decoded[0].dtype == np.uint8


def test_generated_video_round_trips_pixels(tmp_path: Path) -> None:
    frames = moving_shapes(6, 61, 97, seed=1)  # odd size: lossless ffv1
    path = write_video(tmp_path / "odd.mkv", frames, codec="ffv1")
    decoded = np.stack(list(iter_frames(path, short_side=0)))
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).max() <= 2  # RGB -> YUV444 -> RGB rounding
    info = probe(path)
    assert (info.width, info.height, info.fps) == (97, 61, 25.0)


def test_portrait_keeps_orientation(tmp_path: Path) -> None:
    path = write_video(tmp_path / "p.mp4", moving_shapes(3, 320, 180), codec="libx264")
    assert {f.shape for f in iter_frames(path)} == {(455, 256, 3)}


def test_each_bad_input_raises_its_reason(tmp_path: Path) -> None:
    for name, reason in make_bad_videos(tmp_path).items():
        with pytest.raises(VideoError) as err:
            list(iter_frames(tmp_path / name))
        assert reason in str(err.value), name
        assert "\n" not in str(err.value)
