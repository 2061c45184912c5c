"""Our annotation lists read the way mmaction2 reads them: every file it would open exists.

The reading logic below is written from mmaction2's `RawframeDataset.load_data_list` (one line:
frame_dir, total_frames, label), `SampleFrames` in test mode (clip offsets, `loop` out of bound,
`start_index` 1) and `RawFrameDecode` (RGB: `img_{:05}.jpg`; Flow: `flow_{}_{:05d}.jpg` with x, y).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from flowprep.cli import main
from pipelines.synthetic import moving_shapes, write_video


def load_data_list(ann_file: Path, data_prefix: Path) -> list[dict]:
    """mmaction2's RawframeDataset.load_data_list for plain (no offset, single label) lists."""
    infos = []
    for line in ann_file.read_text().splitlines():
        fields = line.strip().split()
        infos.append(
            {
                "frame_dir": str(data_prefix / fields[0]),
                "total_frames": int(fields[1]),
                "label": int(fields[2]),
            }
        )
    return infos


def sample_frames_test(total_frames: int, clip_len: int, num_clips: int) -> np.ndarray:
    """mmaction2's SampleFrames(test_mode=True, frame_interval=1, out_of_bound_opt="loop")."""
    if clip_len == 1:  # 2D recognizer: the middle of num_clips equal segments
        avg_interval = total_frames / float(num_clips)
        offsets = np.arange(num_clips) * avg_interval + avg_interval / 2.0
    else:  # 3D recognizer (and TSN flow's 5-frame stacks)
        ori_clip_len = (clip_len - 1) * 1 + 1
        max_offset = max(total_frames - ori_clip_len, 0)
        if num_clips > 1:
            offsets = np.round(np.arange(num_clips) * (max_offset / float(num_clips - 1)))
        else:
            offsets = np.array([max_offset // 2])
    inds = offsets[:, None] + np.arange(clip_len)[None, :]
    inds = np.mod(inds, total_frames)
    return (np.concatenate(inds) + 1).astype(np.int32)  # start_index 1


def files_opened(info: dict, modality: str, clip_len: int, num_clips: int) -> list[Path]:
    """The files RawFrameDecode opens for one video."""
    folder = Path(info["frame_dir"])
    inds = sample_frames_test(info["total_frames"], clip_len, num_clips)
    if modality == "RGB":
        return [folder / f"img_{i:05}.jpg" for i in inds]
    return [folder / f"flow_{axis}_{i:05d}.jpg" for i in inds for axis in "xy"]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mm")
    videos = root / "videos"
    for cls, frames in (("Up", 7), ("Down", 12)):
        for g in (1, 2):
            write_video(
                videos / cls / f"v_{cls}_g{g:02d}_c01.avi",
                moving_shapes(frames, 32, 40, velocity=(0.0, 1.0), seed=g),
            )
    splits = root / "splits"
    splits.mkdir()
    (splits / "classInd.txt").write_text("1 Up\n2 Down\n")
    (splits / "trainlist01.txt").write_text("Up/v_Up_g01_c01.avi 1\nDown/v_Down_g01_c01.avi 2\n")
    (splits / "testlist01.txt").write_text("Up/v_Up_g02_c01.avi\nDown/v_Down_g02_c01.avi\n")
    manifest, out = root / "manifest.jsonl", root / "frames"
    result = CliRunner().invoke(
        main, ["index", str(videos), "-s", str(splits), "-o", str(manifest)]
    )
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(
        main,
        [
            "extract",
            str(manifest),
            "--video-root",
            str(videos),
            "-o",
            str(out),
            "--modality",
            "both",
            "--short-side",
            "0",
            "--device",
            "cpu",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("subset", ["train", "test"])
@pytest.mark.parametrize(
    "modality, suffix, clip_len",
    [("RGB", "", 1), ("RGB", "", 8), ("Flow", "_flow", 5), ("Flow", "_flow", 1)],
)
def test_every_file_mmaction2_opens_exists(
    extracted: Path, subset: str, modality: str, suffix: str, clip_len: int
) -> None:
    infos = load_data_list(extracted / f"{subset}_split1{suffix}.txt", extracted)
    assert len(infos) == 2
    for info in infos:
        opened = files_opened(info, modality, clip_len, num_clips=25)
        assert len(opened) == 25 * clip_len * (2 if modality == "Flow" else 1)
        missing = sorted({p.name for p in opened if not p.is_file()})
        assert not missing, (info["frame_dir"], missing)
        pattern = "img_*.jpg" if modality == "RGB" else "flow_x_*.jpg"
        count = len(list(Path(info["frame_dir"]).glob(pattern)))
        assert info["total_frames"] == count  # files of that kind, as build_file_list counts


def test_rgb_counts_would_break_flow(extracted: Path) -> None:
    """Why the flow lists exist: with the RGB count, mmaction2 opens a flow that is not there."""
    infos = load_data_list(extracted / "test_split1.txt", extracted)
    missing = [
        p for info in infos for p in files_opened(info, "Flow", 5, num_clips=25) if not p.is_file()
    ]
    assert missing and all(p.name.startswith("flow_") for p in missing)
