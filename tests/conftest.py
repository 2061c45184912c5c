"""Shared fixtures: frame folders in the `flowprep extract` layout, written directly (no video)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

import flowprep.reader as reader_module


def write_frame_folder(
    root: Path,
    video_id: str,
    *,
    num_frames: int = 4,
    height: int = 24,
    width: int = 32,
    label: str | None = "a",
    label_index: int | None = 0,
    flows: bool = True,
    seed: int = 0,
) -> Path:
    """Write OUT/<video_id>/ with img_/flow_x_/flow_y_ JPEGs, meta.json and .done; return it.

    Frames are smooth random images (seeded); flow_x_k / flow_y_k are uint8 ramps offset by k.
    """
    folder = Path(root) / video_id
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(num_frames):
        image = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), np.uint8), (5, 5), 0)
        cv2.imwrite(str(folder / f"img_{i + 1:05d}.jpg"), image)
    num_flows = num_frames - 1 if flows else 0
    ramp = np.linspace(0, 200, width, dtype=np.float32)[None, :].repeat(height, 0)
    for k in range(num_flows):
        cv2.imwrite(str(folder / f"flow_x_{k + 1:05d}.jpg"), (ramp + 5 * k).astype(np.uint8))
        cv2.imwrite(str(folder / f"flow_y_{k + 1:05d}.jpg"), (200 - ramp + 5 * k).astype(np.uint8))
    settings = {"short_side": 0, "modality": "both" if flows else "rgb"}
    meta = {
        "video_id": video_id,
        "source": f"{video_id}.avi",
        "label": label,
        "label_index": label_index,
        "source_width": width,
        "source_height": height,
        "source_fps": 25.0,
        "source_frames": num_frames,
        "width": width,
        "height": height,
        "num_frames": num_frames,
        "num_flows": num_flows,
        "index_base": 1,
        "flow_bound": 20.0,
        "flow_format": "jpeg",
        "settings": settings,
        "settings_hash": "test",
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / ".done").write_text(json.dumps({"settings_hash": "test"}))
    return folder


@pytest.fixture
def make_frame_folder(tmp_path: Path) -> Callable[..., Path]:
    """`make_frame_folder(video_id, root=None, **kw)`: a frame folder under tmp_path/frames."""

    def make(video_id: str, root: Path | None = None, **kw) -> Path:
        return write_frame_folder(root or tmp_path / "frames", video_id, **kw)

    return make


@pytest.fixture(params=["simplejpeg", "cv2"])
def decoder(request, monkeypatch) -> str:
    """Run a test with each JPEG decoder of the reader (cv2 is the fallback without simplejpeg)."""
    if request.param == "cv2":
        monkeypatch.setattr(reader_module, "simplejpeg", None)
    elif reader_module.simplejpeg is None:
        pytest.skip("simplejpeg is not installed")
    return request.param
