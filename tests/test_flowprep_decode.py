"""Decoding with PyAV: sizes, frame counts on real clips, and every kind of broken input."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from bad_videos import SHARED, make_bad_videos

from flowprep.decode import (
    DecodeStats,
    VideoError,
    iter_frames,
    output_size,
    probe,
    quarter_turns,
)
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


def _write_marked(path: Path, n: int, *, rotation: float | None = None, zero_times=False, **opts):
    """An mp4 of `n` 64x32 frames, a white 8x8 block in the top-left corner of each, written by
    PyAV with a display-matrix rotation (counterclockwise degrees) and/or every timestamp 0."""
    with av.open(str(path), "w", format="mp4", options=opts) as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(n + 1):
            image = np.full((32, 64, 3), 40 + i, np.uint8)
            image[:8, :8] = 255
            frame = av.VideoFrame.from_ndarray(image, format="rgb24") if i < n else None
            for packet in stream.encode(frame):
                if zero_times:
                    packet.pts = packet.dts = 0
                container.mux(packet)
    return path


def test_all_timestamps_equal_with_every_frame_there_is_not_truncated(tmp_path: Path) -> None:
    path = _write_marked(tmp_path / "zero.mp4", 30, zero_times=True)
    with av.open(str(path)) as container:  # what a muxer without timestamps leaves
        assert {f.pts for f in container.decode(video=0)} == {0}
    assert probe(path).declared_frames == 30
    assert len(list(iter_frames(path, short_side=0))) == 30  # was "truncated: 30 frames cover"


def test_all_timestamps_equal_and_frames_missing_is_truncated(tmp_path: Path) -> None:
    path = _write_marked(tmp_path / "zero.mp4", 30, zero_times=True, movflags="faststart")
    data = path.read_bytes()
    media = data.find(b"mdat")
    assert 0 < data.find(b"moov") < media  # the index first: it survives the cut
    path.write_bytes(data[: media + (len(data) - media) // 2])
    with pytest.raises(VideoError, match=r"truncated: \d+ of the 30 frames its header declares"):
        list(iter_frames(path, short_side=0))


@pytest.mark.parametrize(
    "rotation, clockwise, corner",
    [(None, 0, (0, 0)), (-90, 90, (0, -1)), (90, 270, (-1, 0)), (180, 180, (-1, -1))],
)
def test_rotation_metadata_is_applied_and_reported(
    tmp_path: Path, rotation: float | None, clockwise: int, corner: tuple[int, int]
) -> None:
    """A phone's portrait video is stored landscape with a display matrix turning it 90 degrees
    clockwise (PyAV reads -90): frames come out as a player (and OpenCV) shows them."""
    path = _write_marked(tmp_path / "r.mp4", 3, rotation=rotation)
    stats = DecodeStats()
    frames = list(iter_frames(path, short_side=16, stats=stats))
    assert stats.rotation == clockwise
    upright = (16, 32) if clockwise in (0, 180) else (32, 16)
    assert {f.shape for f in frames} == {(*upright, 3)}
    bright = frames[0][..., 0] > 200
    y, x = corner
    assert bright[y, x] and bright.sum() < bright.size // 4  # the marked corner, and only it


def test_quarter_turns_of_display_rotations() -> None:
    assert [quarter_turns(a) for a in (0, 90, -90, 180, -180, 270, 89.5)] == [0, 1, 3, 2, 2, 3, 1]
    assert quarter_turns(45) == 0 and quarter_turns(-30) == 0  # not a quarter: left as stored


def test_extract_records_the_rotation_it_applied(tmp_path: Path) -> None:
    from flowprep.extract import extract_video
    from flowprep.manifest import VideoEntry
    from flowprep.settings import ExtractSettings

    (tmp_path / "v").mkdir()
    _write_marked(tmp_path / "v" / "phone.mp4", 3, rotation=-90)
    _write_marked(tmp_path / "v" / "plain.mp4", 3)
    settings = ExtractSettings(short_side=0)
    for name, rotation, size in (("phone", 90, (64, 32)), ("plain", 0, (32, 64))):
        entry = VideoEntry(name, f"{name}.mp4")
        result = extract_video(entry, tmp_path / "v", tmp_path / "out", settings)
        assert result.status == "done", result.reason
        meta = json.loads((tmp_path / "out" / name / "meta.json").read_text())
        assert meta["rotation"] == rotation
        assert (meta["height"], meta["width"]) == size  # upright; source_* stay as stored
        assert (meta["source_height"], meta["source_width"]) == (32, 64)


def test_folders_written_before_rotation_was_applied_are_redone(tmp_path: Path) -> None:
    """meta.json without "rotation" (flowprep before the fix) of a rotated video: extracted again,
    upright; of an unrotated one: kept. Resume decodes one frame for such folders only."""
    from flowprep.decode import display_rotation
    from flowprep.extract import run_batch
    from flowprep.manifest import VideoEntry
    from flowprep.settings import ExtractSettings

    (tmp_path / "v").mkdir()
    _write_marked(tmp_path / "v" / "phone.mp4", 3, rotation=-90)
    _write_marked(tmp_path / "v" / "plain.mp4", 3)
    assert [display_rotation(tmp_path / "v" / f"{n}.mp4") for n in ("phone", "plain")] == [90, 0]
    entries = [VideoEntry(n, f"{n}.mp4") for n in ("phone", "plain")]
    settings, out = ExtractSettings(short_side=0), tmp_path / "out"
    run_batch(entries, tmp_path / "v", out, settings)
    for name in ("phone", "plain"):  # as an older flowprep left them
        meta = json.loads((out / name / "meta.json").read_text())
        del meta["rotation"]
        (out / name / "meta.json").write_text(json.dumps(meta))
    results = {r.video_id: r.status for r in run_batch(entries, tmp_path / "v", out, settings)}
    assert results == {"phone": "done", "plain": "skipped"}
    assert json.loads((out / "phone" / "meta.json").read_text())["rotation"] == 90
    assert "rotation" not in json.loads((out / "plain" / "meta.json").read_text())
    again = {r.video_id: r.status for r in run_batch(entries, tmp_path / "v", out, settings)}
    assert again == {"phone": "skipped", "plain": "skipped"}


def test_shards_packed_before_rotation_was_applied_are_redone(tmp_path: Path) -> None:
    """The same for `extract --format hdf5`: a shard stamp (the `.done` marker) without
    "rotation" of a rotated video is extracted and packed again; an unrotated one is kept."""
    from flowprep.extract_hdf5 import extract_to_shards
    from flowprep.manifest import VideoEntry
    from flowprep.settings import ExtractSettings

    (tmp_path / "v").mkdir()
    _write_marked(tmp_path / "v" / "phone.mp4", 3, rotation=-90)
    _write_marked(tmp_path / "v" / "plain.mp4", 3)
    entries = [VideoEntry(n, f"{n}.mp4") for n in ("phone", "plain")]
    settings, out = ExtractSettings(short_side=0), tmp_path / "shards"
    extract_to_shards(entries, tmp_path / "v", out, settings)
    index = json.loads((out / "index.json").read_text())
    assert {v["rotation"] for v in index["stamps"].values()} == {0, 90}
    for stamp in index["stamps"].values():
        del stamp["rotation"]  # as an older flowprep packed them
    (out / "index.json").write_text(json.dumps(index))
    results = {
        r.video_id: r.status for r in extract_to_shards(entries, tmp_path / "v", out, settings)
    }
    assert results == {"phone": "done", "plain": "skipped"}
    assert json.loads((out / "index.json").read_text())["stamps"]["phone"]["rotation"] == 90
