"""`flowprep extract --modality flow|both`: flow frames, pairing, metadata, and the device path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_flowprep_extract import tree_bytes

from flowprep.cli import EXIT_SOME_FAILED, main
from flowprep.extract import joblib_mapper, run_batch
from flowprep.manifest import build_manifest
from flowprep.quantize import dequantize_flow
from flowprep.settings import ExtractSettings, RuntimeOptions
from pipelines.synthetic import moving_shapes, write_video

SMALL = ["--short-side", "0", "--device", "cpu", "-q"]


@pytest.fixture
def clips(tmp_path: Path) -> Path:
    root = tmp_path / "v"
    # the camera pans right by 1 px/frame (half the shape's velocity), so most flow_x is -1
    write_video(root / "a.mkv", moving_shapes(5, 48, 64, velocity=(2.0, 0.0), seed=0), codec="ffv1")
    write_video(root / "one.mkv", moving_shapes(1, 48, 64, seed=1), codec="ffv1")
    return root


def test_both_modalities_pair_flow_k_with_frame_k(clips: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    result = CliRunner().invoke(
        main,
        ["extract", str(clips), "-o", str(out), "--modality", "both", "--flow-batch", "3", *SMALL],
    )
    assert result.exit_code == EXIT_SOME_FAILED, result.output  # one.mkv: see below
    folder = out / "a"
    assert len(list(folder.glob("img_*.jpg"))) == 5
    assert sorted(p.name for p in folder.glob("flow_x_*.jpg")) == [
        f"flow_x_{i:05d}.jpg" for i in range(1, 5)
    ]  # F - 1 flows, 1-based like the frames
    assert len(list(folder.glob("flow_y_*.jpg"))) == 4
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["num_frames"], meta["num_flows"], meta["flow_bound"]) == (5, 4, 20.0)
    for k in range(1, 5):
        fx = dequantize_flow(np.asarray(Image.open(folder / f"flow_x_{k:05d}.jpg")), 20.0)
        fy = dequantize_flow(np.asarray(Image.open(folder / f"flow_y_{k:05d}.jpg")), 20.0)
        assert abs(np.median(fx) + 1.0) < 0.25 and abs(np.median(fy)) < 0.25, k
    assert not (out / "one").exists()  # 1 frame, no pair: failed, not listed with 0 flows


@pytest.mark.parametrize("modality", ["both", "flow"])
def test_one_frame_video_fails_for_flow(clips: Path, tmp_path: Path, modality: str) -> None:
    out = tmp_path / "o"
    result = CliRunner().invoke(
        main, ["extract", str(clips), "-o", str(out), "--modality", modality, *SMALL]
    )
    assert result.exit_code == EXIT_SOME_FAILED
    assert json.loads((out / "failures.jsonl").read_text()) == {
        "video_id": "one",
        "source": "one.mkv",
        "reason": "needs >= 2 frames for flow (1 decoded, no frame pair)",
    }
    assert (out / "all.txt").read_text() == "a 5 -1\n"
    rgb = CliRunner().invoke(main, ["extract", str(clips), "-o", str(tmp_path / "r"), *SMALL])
    assert rgb.exit_code == 0 and (tmp_path / "r" / "all.txt").read_text() == "a 5 -1\none 1 -1\n"


def test_flow_only_and_raw_float(clips: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    result = CliRunner().invoke(
        main,
        [
            "extract",
            str(clips),
            "-o",
            str(out),
            "--modality",
            "flow",
            "--flow-format",
            "npy",
            *SMALL,
        ],
    )
    assert result.exit_code == EXIT_SOME_FAILED, result.output  # one.mkv has no frame pair
    assert not list(out.glob("*/img_*.jpg"))
    flow = np.load(out / "a" / "flow_00002.npy")
    assert flow.shape == (48, 64, 2) and flow.dtype == np.float32
    assert abs(np.median(flow[..., 0]) + 1.0) < 0.25


def test_device_service_matches_per_video_path(clips: Path, tmp_path: Path) -> None:
    """Decoding threads + a shared flow device thread write what the plain per-video loop does."""
    entries = build_manifest(clips)
    settings = ExtractSettings(short_side=0, modality="both")
    options = RuntimeOptions(device="cpu", flow_batch=2)
    run_batch(entries, clips, tmp_path / "service", settings, options=options, jobs=2)
    run_batch(
        entries, clips, tmp_path / "plain", settings, options=options, mapper=joblib_mapper(1)
    )
    assert tree_bytes(tmp_path / "service") == tree_bytes(tmp_path / "plain")


def test_changing_flow_settings_redoes_videos(clips: Path, tmp_path: Path) -> None:
    entries = build_manifest(clips)
    options = RuntimeOptions(device="cpu")
    first = ExtractSettings(short_side=0, modality="both")
    run_batch(entries, clips, tmp_path / "o", first, options=options)
    again = run_batch(entries, clips, tmp_path / "o", first, options=options)
    assert {r.video_id: r.status for r in again} == {"a": "skipped", "one": "failed"}
    tighter = ExtractSettings(short_side=0, modality="both", flow_bound=10.0)
    redone = run_batch(entries, clips, tmp_path / "o", tighter, options=options)
    assert {r.video_id: r.status for r in redone} == {"a": "done", "one": "failed"}
    assert json.loads((tmp_path / "o" / "a" / "meta.json").read_text())["flow_bound"] == 10.0
