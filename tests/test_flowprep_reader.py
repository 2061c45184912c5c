"""The reader over frame folders: exact frames back, flow k with frame k, clear errors, and the
same JPEG verdicts from simplejpeg and from the cv2 fallback."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import flowprep.reader as reader_module
from flowprep.extract import run_batch
from flowprep.manifest import build_manifest
from flowprep.quantize import quantize_flow
from flowprep.reader import ReaderError, decode_jpeg, open_reader
from flowprep.settings import ExtractSettings, RuntimeOptions
from pipelines.synthetic import moving_shapes, write_video


@pytest.fixture(scope="module")
def frames_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("reader")
    videos = tmp / "v"
    write_video(videos / "run" / "a.mkv", moving_shapes(4, 40, 56, velocity=(2, 0)), codec="ffv1")
    write_video(videos / "jump" / "b.mkv", moving_shapes(3, 40, 56, seed=2), codec="ffv1")
    settings = ExtractSettings(short_side=0, modality="both", jpeg_quality=100)
    run_batch(
        build_manifest(videos), videos, tmp / "o", settings, options=RuntimeOptions(device="cpu")
    )
    return tmp / "o"


def test_reader_lists_videos_and_returns_frames(frames_root: Path) -> None:
    r = open_reader(frames_root)
    assert r.video_ids == ["jump/b", "run/a"] and len(r) == 2 and "run/a" in r
    v = r["run/a"]
    assert (v.num_frames, v.num_flows, v.label_index) == (4, 3, 1)
    rgb = v.rgb([3, 0])
    assert rgb.shape == (2, 40, 56, 3) and rgb.dtype == np.uint8
    source = moving_shapes(4, 40, 56, velocity=(2, 0))
    errors = [np.abs(rgb[0].astype(int) - f).mean() for f in source]  # JPEG 4:2:0: ~3.5 levels
    assert int(np.argmin(errors)) == 3 and errors[3] < 5  # index 3 is the 4th frame
    flow = v.flow([0, 2])
    assert flow.shape == (2, 40, 56, 2) and flow.dtype == np.uint8
    # the camera pans right 1 px/frame: flow x is mostly -1 px, i.e. q = round(255 * 19/40) = 121
    assert abs(int(np.median(flow[..., 0])) - int(quantize_flow(np.array([-1.0]))[0])) <= 2
    assert abs(int(np.median(flow[..., 1])) - 128) <= 2


def test_reader_errors_name_video_and_cause(frames_root: Path, tmp_path: Path) -> None:
    r = open_reader(frames_root)
    with pytest.raises(KeyError, match="no finished video 'nope'"):
        r["nope"]
    with pytest.raises(ReaderError, match="run/a: flow index 3 out of range 0..2"):
        r["run/a"].flow([3])
    with pytest.raises(ReaderError, match="not a directory"):
        open_reader(tmp_path / "missing")


class _Frames(Dataset):
    def __init__(self, root: Path):
        self.reader = open_reader(root)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.reader[self.reader.video_ids[i]].rgb([0]))


def test_reader_in_dataloader_workers(frames_root: Path) -> None:
    batches = list(DataLoader(_Frames(frames_root), batch_size=1, num_workers=2))
    direct = [torch.from_numpy(open_reader(frames_root)[v].rgb([0])) for v in ["jump/b", "run/a"]]
    assert all(torch.equal(b[0], d) for b, d in zip(batches, direct, strict=True))


def _jpeg(gray: bool) -> bytes:
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (48, 64, 3), np.uint8), (5, 5), 0)
    image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if gray else image
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def _flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes(b ^ 0x5A for b in data[at : at + 16]) + data[at + 16 :]


@pytest.mark.parametrize("gray", [False, True])
def test_decoders_agree_on_good_and_corrupt_jpegs(decoder: str, gray: bool, capfd) -> None:
    good = _jpeg(gray)
    image = decode_jpeg(good, gray=gray, where="x.jpg")
    assert image.shape == ((48, 64) if gray else (48, 64, 3)) and image.dtype == np.uint8
    bgr = cv2.imdecode(np.frombuffer(good, np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.abs(image.astype(int) - (bgr if gray else bgr[..., ::-1])).max() <= 1
    assert np.array_equal(decode_jpeg(good + b"\0\0", gray=gray, where="x.jpg"), image)
    corrupt = {
        "flipped": _flipped(good, len(good) // 2),  # cv2.imdecode alone: a warning, an image
        "truncated": good[: len(good) // 2],
        "truncated, end marker kept": good[: len(good) // 2] + b"\xff\xd9",
        "header": _flipped(good, 20),
        "garbage": b"not a jpeg",
        "empty": b"",
    }
    for case, data in corrupt.items():
        with pytest.raises(ReaderError, match=r"^x\.jpg: not a decodable JPEG \(.+\)$"):
            decode_jpeg(data, gray=gray, where="x.jpg")
            pytest.fail(f"{decoder} accepted the {case} JPEG")
    os.write(2, b"fd 2 is back\n")
    assert capfd.readouterr().err == "fd 2 is back\n"  # libjpeg's warnings became errors


def test_reader_in_dataloader_workers_with_cv2_fallback(frames_root: Path, monkeypatch) -> None:
    monkeypatch.setattr(reader_module, "simplejpeg", None)  # the forked workers inherit it
    batches = list(DataLoader(_Frames(frames_root), batch_size=1, num_workers=2))
    monkeypatch.undo()
    direct = [torch.from_numpy(open_reader(frames_root)[v].rgb([0])) for v in ["jump/b", "run/a"]]
    assert all(
        (b[0].int() - d.int()).abs().max() <= 1 for b, d in zip(batches, direct, strict=True)
    )
