"""The synthetic UCF101-layout datasets: index like UCF101, move as their classes say, and the
action set's class pairs differ only in the evidence their kind is about."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from flowprep.decode import iter_frames
from flowprep.flow import make_params, opencv_tvl1
from flowprep.manifest import build_manifest
from pipelines.render import COLOURS, Clip, render_clip, sample_clip
from pipelines.synthetic import (
    ACTION_CLASSES,
    KINDS,
    action_clip_names,
    class_velocity,
    moving_shapes,
    write_action_set,
    write_ucf_like_dataset,
    write_video,
)


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


# --- the synthetic action set: eight classes, each pair needs its own evidence -----------------

SIZE = (48, 48)  # width, height


def clip_of(name: str, seed: int, frames: int = 12, size: tuple[int, int] = SIZE) -> Clip:
    return sample_clip(name, np.random.default_rng(seed), frames=frames, size=size)


def gray(frames: np.ndarray) -> np.ndarray:
    """What flowprep computes flow on: cv2 RGB2GRAY of every frame, as int."""
    return np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]).astype(int)


def decoded(frames: np.ndarray, path: Path) -> np.ndarray:
    """`frames` after the round trip the dataset takes: mpeg4 yuv420p at qscale 2, then decode."""
    write_video(path, frames, threads=1, fixed_qscale=True)
    return np.stack(list(iter_frames(path, short_side=min(frames.shape[1:3]))))


def sprite_pixels(clip: Clip) -> np.ndarray:
    """(T, H, W) True where a sprite covers a pixel (from the rendering of the truth)."""
    frames = render_clip(clip).astype(int)
    return np.abs(frames - np.rint(clip.background)).sum(-1) > 3


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_action_set_indexes_like_ucf101_with_three_disjoint_test_splits(tmp_path: Path) -> None:
    info = write_action_set(tmp_path, per_class=3, frames=4, size=SIZE, seed=1)
    names = list(ACTION_CLASSES)
    assert info == json.loads((tmp_path / "classes.json").read_text())
    assert [(c["name"], c["kind"], c["index"]) for c in info["classes"]] == [
        (n, ACTION_CLASSES[n], i) for i, n in enumerate(names)
    ]
    assert info["settings"] == {"per_class": 3, "frames": 4, "size": [48, 48], "seed": 1}
    assert set(ACTION_CLASSES.values()) == set(KINDS)
    assert all(list(ACTION_CLASSES.values()).count(k) == 2 for k in KINDS)
    assert all(n.isalpha() and n[0].isupper() for n in names)
    entries = build_manifest(tmp_path / "videos", tmp_path)
    assert len(entries) == 24 and len(list((tmp_path / "videos").rglob("*.avi"))) == 24
    for e in entries:
        assert e.label_index == names.index(e.label) and e.path.startswith(f"{e.label}/v_")
        assert sorted(e.splits.values()) == ["test", "train", "train"]
        group = int(e.path.split("_g")[1][:2])  # split s tests the groups with (g-1) % 3 == s-1
        assert e.splits[str((group - 1) % 3 + 1)] == "test"
    for split in "123":  # every class is tested in every split
        assert {e.label for e in entries if e.splits[split] == "test"} == set(names)
    assert (tmp_path / "classInd.txt").read_text().splitlines()[:2] == [
        "1 PatternStripes",
        "2 PatternChecks",
    ]
    assert len(json.loads(json.dumps(info))["classes"]) == 8
    assert action_clip_names(12) == [(i % 3 + 1, i // 3 + 1) for i in range(12)]  # 3 groups of 4
    assert max(g for g, _ in action_clip_names(200)) == 25  # at most 25 groups, as UCF101


def test_action_set_is_deterministic_and_a_rerun_completes_a_killed_one(tmp_path: Path) -> None:
    kw = {"classes": ["MoveUp", "RedUpGreenDown"], "per_class": 2, "frames": 4, "size": SIZE}
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_action_set(a, **kw)
    write_action_set(b, **kw)
    reference = files_of(a)
    assert reference == files_of(b) and len(reference) == 4 + 9  # 4 videos, 9 text/json files
    write_action_set(c, **{**kw, "seed": 1})
    other = files_of(c)
    assert all(reference[k] != other[k] for k in reference if k.endswith(".avi"))
    # a class's videos do not depend on which other classes are rendered
    write_action_set(c, **{**kw, "classes": ["MoveUp"]})
    assert (
        files_of(c)["videos/MoveUp/v_MoveUp_g01_c01.avi"]
        == reference["videos/MoveUp/v_MoveUp_g01_c01.avi"]
    )
    assert not (c / "videos" / "RedUpGreenDown").exists()  # the folder says what was asked
    # killed mid-way: a video and classes.json missing, a temporary file left behind
    (b / "videos/MoveUp/v_MoveUp_g02_c01.avi").unlink()
    (b / "classes.json").unlink()
    (b / ".partial").mkdir()
    (b / ".partial/v_MoveUp_g02_c01.avi").write_bytes(b"half")
    write_action_set(b, **kw)
    assert files_of(b) == reference
    # other settings re-render everything, and going back gives the same bytes again
    write_action_set(b, **{**kw, "per_class": 1})
    assert sorted(p.name for p in (b / "videos").rglob("*.avi")) == [
        "v_MoveUp_g01_c01.avi",
        "v_RedUpGreenDown_g01_c01.avi",
    ]
    write_action_set(b, **kw)
    assert files_of(b) == reference


def test_action_set_rejects_unknown_classes_and_odd_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown class names Jump, Run;"):
        write_action_set(tmp_path, classes=["MoveUp", "Jump", "Run"])
    with pytest.raises(ValueError, match="size 47x48: mpeg4 needs an even width and height"):
        write_action_set(tmp_path, size=(47, 48))
    assert not any(tmp_path.iterdir())  # nothing written before the arguments are checked


def test_appearance_pair_moves_alike_and_differs_in_pattern() -> None:
    energy: dict[str, list[float]] = {"PatternStripes": [], "PatternChecks": []}
    anisotropy: dict[str, list[float]] = {"PatternStripes": [], "PatternChecks": []}
    for seed in range(6):
        stripes, checks = clip_of("PatternStripes", seed), clip_of("PatternChecks", seed)
        s, c = stripes.sprites[0], checks.sprites[0]  # same draws: only the pattern differs
        assert (s.pattern, c.pattern) == ("stripes", "checks")
        assert s.x == c.x and np.array_equal(s.y, c.y) and s.colour == c.colour
        for clip in (stripes, checks):
            frames = gray(render_clip(clip)).astype(float)
            inside = sprite_pixels(clip)
            energy[clip.name].append(float(np.mean(np.diff(frames, axis=0) ** 2)))
            dx = np.abs(np.diff(frames, axis=2))[:, 1:-1, :-1][inside[:, 1:-1, 1:-1]]
            dy = np.abs(np.diff(frames, axis=1))[:, :-1, 1:-1][inside[:, 1:-1, 1:-1]]
            anisotropy[clip.name].append(float(dx.mean() / dy.mean()))
    ratio = np.mean(energy["PatternStripes"]) / np.mean(energy["PatternChecks"])
    assert 0.75 < ratio < 1.33  # frame-difference (motion) energy alike
    assert max(anisotropy["PatternStripes"]) < 0.5 < 0.8 < min(anisotropy["PatternChecks"])
    # the direction is drawn 50/50 in both classes, independently of the pattern
    ups = [
        np.diff(clip_of(n, k, size=(16, 16)).sprites[0].y)[0] < 0
        for n in energy
        for k in range(200)
    ]
    assert 0.42 < np.mean(ups[:200]) < 0.58 and 0.42 < np.mean(ups[200:]) < 0.58


def test_motion_pair_has_the_same_frames_in_opposite_order(tmp_path: Path) -> None:
    for seed in range(3):
        up, down = clip_of("MoveUp", seed), clip_of("MoveDown", seed)
        assert np.all(np.diff(up.sprites[0].y) < 0) and np.all(np.diff(down.sprites[0].y) > 0)
        frames_up, frames_down = render_clip(up), render_clip(down)
        assert np.abs(frames_down.astype(int) - frames_up[::-1]).max() <= 1
    # over independent clips, the rows a sprite is seen at are distributed alike
    rows = {
        n: np.concatenate([clip_of(n, k, size=(16, 16)).sprites[0].y for k in range(300)])
        for n in ("MoveUp", "MoveDown")
    }
    grid = np.linspace(0, 16, 33)
    cdf = {n: np.searchsorted(np.sort(r), grid) / len(r) for n, r in rows.items()}
    assert np.abs(cdf["MoveUp"] - cdf["MoveDown"]).max() < 0.06
    # TV-L1 on the decoded gray frames (what flowprep computes) sees vertical motion only
    params = make_params()
    for name, sign in (("MoveUp", -1), ("MoveDown", 1)):
        frames = gray(decoded(render_clip(clip_of(name, 7, frames=5)), tmp_path / f"{name}.avi"))
        flow = np.stack(
            [
                opencv_tvl1(a, b, params)
                for a, b in zip(
                    frames[:-1].astype(np.float32), frames[1:].astype(np.float32), strict=True
                )
            ]
        )
        moving = np.abs(flow[..., 1]) > 0.3
        assert moving.mean() > 0.05 and sign * flow[..., 1][moving].mean() > 0.5
        assert abs(flow[..., 0][moving].mean()) < 0.1 * abs(flow[..., 1][moving].mean())


def test_wmw_pair_is_the_same_in_gray_and_differs_only_in_colour(tmp_path: Path) -> None:
    for seed in range(3):
        a, b = clip_of("RedUpGreenDown", seed), clip_of("RedDownGreenUp", seed)
        colour_of_mover = {
            n: {np.sign(np.diff(s.y)[0]): s.colour for s in c.sprites}
            for n, c in (("a", a), ("b", b))
        }
        assert colour_of_mover == {"a": {-1: "red", 1: "green"}, "b": {-1: "green", 1: "red"}}
        frames_a, frames_b = render_clip(a), render_clip(b)
        assert np.abs(gray(frames_a) - gray(frames_b)).max() <= 1
        inside = sprite_pixels(a)
        assert np.abs(frames_a.astype(int) - frames_b)[inside].mean() > 40  # colours differ
        dec_a = decoded(frames_a, tmp_path / "a.avi")
        dec_b = decoded(frames_b, tmp_path / "b.avi")
        assert np.abs(gray(dec_a) - gray(dec_b)).mean() < 1.0  # codec noise only
        assert abs((gray(dec_a) - gray(dec_b))[inside].mean()) < 0.3
    # the two colours have equal luma after yuv420p, at the darkest, mean and brightest gain
    for gain in (0.45, 1.0, 1.38):
        patch = np.zeros((4, 32, 32, 3), np.uint8)
        patch[:, :, :16] = np.rint(COLOURS["red"] * gain)
        patch[:, :, 16:] = np.rint(COLOURS["green"] * gain)
        luma = gray(decoded(patch, tmp_path / "patch.avi"))[:, 4:-4]
        assert abs(luma[..., 4:12].mean() - luma[..., 20:28].mean()) < 2
    # the up-mover is left or right 50/50, so red-left says nothing either
    lefts = [clip_of("RedUpGreenDown", k, size=(32, 16)).sprites[0].x < 15.5 for k in range(300)]
    assert 0.42 < np.mean(lefts) < 0.58


def test_order_pair_reverses_halfway_with_the_same_frames_and_velocities() -> None:
    frames, window = 12, 4
    for seed in range(3):
        a, b = clip_of("UpThenDown", seed, frames), clip_of("DownThenUp", seed, frames)
        va, vb = np.diff(a.sprites[0].y), np.diff(b.sprites[0].y)
        half = frames // 2 - 1
        assert np.all(va[:half] < 0) and np.all(va[-half:] > 0)  # up, then down
        assert np.all(vb[:half] > 0) and np.all(vb[-half:] < 0)
        assert np.allclose(np.sort(va), np.sort(vb))  # same per-frame velocities
        means = [np.sort(np.convolve(v, np.ones(window) / window, "valid")) for v in (va, vb)]
        assert np.allclose(*means)  # same velocity histogram over windows of 4 flows
        assert np.allclose(np.sort(a.sprites[0].y), np.sort(b.sprites[0].y))  # same rows
        rolled = np.roll(render_clip(a), frames // 2, axis=0).astype(int)
        assert np.abs(rolled - render_clip(b)).max() <= 1  # b is a rolled by half: same frames


@pytest.mark.parametrize("name", list(ACTION_CLASSES))
def test_every_class_is_mirror_invariant_and_moves_vertically(name: str) -> None:
    clip = clip_of(name, 3)
    mirrored = clip.mirrored()
    assert np.abs(render_clip(mirrored).astype(int) - render_clip(clip)[:, :, ::-1]).max() <= 1
    # the mirrored truth is a clip of the same class: same patterns, colours and vertical motion
    for s, m in zip(clip.sprites, mirrored.sprites, strict=True):
        assert (s.shape, s.pattern, s.colour) == (m.shape, m.pattern, m.colour)
        assert np.array_equal(s.y, m.y) and m.x == SIZE[0] - 1 - s.x
    # no horizontal motion: the columns a sprite covers are the same in every frame
    columns = sprite_pixels(clip).any(axis=1)
    assert columns.any() and (columns == columns[0]).all()
    # left and right equally likely (the first sprite of wmw is the up-mover)
    lefts = [clip_of(name, k, size=(32, 16)).sprites[0].x < 15.5 for k in range(300)]
    assert 0.42 < np.mean(lefts) < 0.58
