"""The synthetic UCF101-layout dataset: indexes like UCF101 and moves as its class says."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flowprep.manifest import build_manifest
from pipelines.synthetic import class_velocity, moving_shapes, write_ucf_like_dataset


def test_dataset_indexes_with_three_disjoint_test_splits(tmp_path: Path) -> None:
    videos, splits = write_ucf_like_dataset(
        tmp_path, num_classes=3, groups=3, num_frames=4, size=(32, 48)
    )
    entries = build_manifest(videos, splits)
    assert len(entries) == 9 and {e.label_index for e in entries} == {0, 1, 2}
    for e in entries:
        assert sorted(e.splits.values()) == ["test", "train", "train"]  # one held-out split each
        assert e.label == f"Class{e.label_index:02d}"


def test_shape_moves_by_class_velocity() -> None:
    dx, dy = class_velocity(1, 4)  # 90 degrees: straight down at 3 px/frame
    assert abs(dx) < 1e-9 and dy == 3.0
    frames = moving_shapes(2, 60, 90, velocity=(3.0, 0.0), seed=4).astype(int)
    patch = frames[0, 25:35, 35:45]
    errors = {s: np.abs(frames[1, 25:35, 35 + s : 45 + s] - patch).mean() for s in range(-4, 5)}
    assert min(errors, key=errors.get) == 3
