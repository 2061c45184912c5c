"""The reader over frame folders: exact frames back, flow k with frame k, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from flowprep.extract import ExtractSettings, RuntimeOptions, run_batch
from flowprep.manifest import build_manifest
from flowprep.quantize import quantize_flow
from flowprep.reader import ReaderError, open_reader
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
