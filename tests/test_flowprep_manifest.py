"""Manifests from UCF101 / HMDB51 split files and folder trees, and their path safety."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowprep.cli import main
from flowprep.manifest import ManifestError, build_manifest, read_manifest, write_manifest
from pipelines.synthetic import moving_shapes, write_video


def _touch(root: Path, rel: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(b"x")


@pytest.fixture
def ucf(tmp_path: Path) -> tuple[Path, Path]:
    videos, splits = tmp_path / "UCF-101", tmp_path / "ucfTrainTestlist"
    splits.mkdir()
    (splits / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Archery\n3 BabyCrawling\n")
    names = {
        c: [f"{c}/v_{c}_g0{g}_c01.avi" for g in (1, 2, 3)]
        for c in ("ApplyEyeMakeup", "Archery", "BabyCrawling")
    }
    for rels in names.values():
        for rel in rels:
            _touch(videos, rel)
    for split in "123":
        g_test = int(split)  # group N is the test group of split N
        train = [r for rs in names.values() for r in rs if f"_g0{g_test}_" not in r]
        test = [r for rs in names.values() for r in rs if f"_g0{g_test}_" in r]
        (splits / f"trainlist0{split}.txt").write_text(
            "".join(f"{r} {1 + list(names).index(r.split('/')[0])}\n" for r in train[:-1])
        )
        (splits / f"testlist0{split}.txt").write_text("".join(f"{r}\r\n" for r in test))
    return videos, splits


def test_ucf101_labels_are_zero_based_and_splits_complete(ucf: tuple[Path, Path]) -> None:
    videos, splits = ucf
    entries = {e.video_id: e for e in build_manifest(videos, splits)}
    assert len(entries) == 9
    e = entries["Archery/v_Archery_g02_c01"]
    assert (e.label, e.label_index, e.path) == ("Archery", 1, "Archery/v_Archery_g02_c01.avi")
    assert e.splits == {"1": "train", "2": "test", "3": "train"}
    assert entries["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01"].label_index == 0
    # the last train video of each split was left out of its trainlist: unused there
    assert entries["BabyCrawling/v_BabyCrawling_g03_c01"].splits["1"] == "unused"
    assert entries["BabyCrawling/v_BabyCrawling_g03_c01"].splits["3"] == "test"


@pytest.mark.parametrize(
    "bad, cause",
    [("../../etc/passwd.avi", "leaves the video root"), ("/etc/passwd.avi", "is absolute")],
)
def test_ucf101_rejects_paths_outside_root(ucf: tuple[Path, Path], bad: str, cause: str) -> None:
    videos, splits = ucf
    with open(splits / "testlist02.txt", "a") as f:
        f.write(f"{bad}\n")
    with pytest.raises(ManifestError) as err:
        build_manifest(videos, splits)
    assert str(err.value).startswith(f"{splits / 'testlist02.txt'}:4: path ")
    assert cause in str(err.value)
    result = CliRunner().invoke(main, ["index", str(videos), "-s", str(splits), "-o", "m.jsonl"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and cause in result.output


def test_hmdb51_split_codes(tmp_path: Path) -> None:
    splits = tmp_path / "splits"
    splits.mkdir()
    for label in ("wave", "brush_hair"):
        for split in "123":
            (splits / f"{label}_test_split{split}.txt").write_text(
                f"{label}_a.avi 1 \n{label}_b.avi {split if split != '3' else 0} \n"
            )
    entries = {e.video_id: e for e in build_manifest(tmp_path, splits)}
    assert entries["brush_hair/brush_hair_a"].label_index == 0  # sorted class names
    assert entries["wave/wave_b"].label_index == 1
    assert entries["wave/wave_b"].splits == {"1": "train", "2": "test", "3": "unused"}
    assert entries["wave/wave_a"].path == "wave/wave_a.avi"


def test_folder_tree_and_round_trip(tmp_path: Path) -> None:
    for rel in ("run/a.mp4", "jump/b.avi", "jump/sub/c.mkv", "loose.avi", "notes.txt"):
        _touch(tmp_path / "v", rel)
    entries = build_manifest(tmp_path / "v")
    assert [(e.video_id, e.label, e.label_index) for e in entries] == [
        ("jump/b", "jump", 0),
        ("jump/sub/c", "jump", 0),
        ("loose", None, None),
        ("run/a", "run", 1),
    ]
    write_manifest(entries, tmp_path / "m.jsonl")
    assert read_manifest(tmp_path / "m.jsonl") == entries


def test_bad_class_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "classInd.txt").write_text("1 A\nthree B\n")
    result = CliRunner().invoke(
        main, ["index", str(tmp_path), "-s", str(tmp_path), "-o", str(tmp_path / "m.jsonl")]
    )
    assert result.exit_code == 1
    assert (
        result.output
        == f"Error: {tmp_path / 'classInd.txt'}:2: expected '<1-based id> <class>', got 'three B'\n"
    )


def test_hmdb51_checks_the_listed_name_before_adding_the_class(tmp_path: Path) -> None:
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "wave_test_split1.txt").write_text("wave_a.avi 1\n/etc/passwd.avi 2\n")
    with pytest.raises(ManifestError) as err:
        build_manifest(tmp_path, splits)
    assert str(err.value) == (
        f"{splits / 'wave_test_split1.txt'}:2: path '/etc/passwd.avi' is absolute; "
        "it must be a relative path"
    )
    (splits / "wave_test_split1.txt").write_text("../../etc/passwd.avi 1\n")
    with pytest.raises(ManifestError, match=r"_test_split1.txt:1: path .* leaves the video root"):
        build_manifest(tmp_path, splits)


@pytest.mark.parametrize(
    "field, value, cause",
    [
        ("video_id", "../escaped", "video_id '../escaped' leaves the output folder"),
        ("video_id", "a/../../victim", "video_id 'a/../../victim' leaves the output folder"),
        ("video_id", "/tmp/abs", "video_id '/tmp/abs' is absolute"),
        ("video_id", "", "video_id '' is empty"),
        ("video_id", "./", "video_id './' is empty"),
        ("video_id", None, "video_id must be a string"),
        ("path", "../v/a.avi", "path '../v/a.avi' leaves the video root"),
        ("path", "/etc/passwd", "path '/etc/passwd' is absolute"),
    ],
)
def test_read_manifest_rejects_ids_and_paths_that_leave_their_root(
    tmp_path: Path, field: str, value: object, cause: str
) -> None:
    good = {"video_id": "run/a", "path": "run/a.avi", "label": "run", "label_index": 0}
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(good) + "\n" + json.dumps({**good, field: value}) + "\n")
    with pytest.raises(ManifestError) as err:
        read_manifest(manifest)
    assert str(err.value).startswith(f"{manifest}:2: {cause}")
    assert "\n" not in str(err.value)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("video_id", ["../victim", "../../victim", "../escaped", "<tmp>/abs/x"])
def test_extract_with_a_hostile_manifest_touches_nothing(tmp_path: Path, video_id: str) -> None:
    video_id = video_id.replace("<tmp>", str(tmp_path))  # an absolute id, inside the sandbox
    write_video(tmp_path / "v" / "a.avi", moving_shapes(2, 32, 32))
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "precious.txt").write_text("keep me\n")
    manifest = tmp_path / "v" / "m.jsonl"
    manifest.write_text(json.dumps({"video_id": video_id, "path": "a.avi"}) + "\n")
    before = _snapshot(tmp_path)
    out = tmp_path / "work" / "out"
    result = CliRunner().invoke(main, ["extract", str(manifest), "-o", str(out), "-q"])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {manifest}:1: video_id {video_id!r} ")
    assert result.output.count("\n") == 1
    assert _snapshot(tmp_path) == before  # OUT not even created, the victim untouched


def test_empty_manifest_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text("\n")
    result = CliRunner().invoke(main, ["extract", str(tmp_path / "m.jsonl"), "-o", "o"])
    assert result.exit_code == 1
    assert result.output == f"Error: {tmp_path / 'm.jsonl'}: the manifest lists no videos\n"


@pytest.mark.parametrize(
    "field, value, cause",
    [
        ("splits", {"X/../../../../tmp/x": "train"}, "split key 'X/../../../../tmp/x' must be"),
        ("splits", {"1": "train\nevil 1 1"}, "split 1 is 'train\\nevil 1 1'; expected one of"),
        ("splits", {"1": "validation"}, "split 1 is 'validation'; expected one of"),
        ("splits", ["1"], "splits ['1'] must be an object"),
        ("label_index", "0\nevil 9 9", "label_index '0\\nevil 9 9' must be a non-negative"),
        ("label_index", "3", "label_index '3' must be a non-negative integer or null"),
        ("label_index", True, "label_index True must be"),
        ("label_index", -1, "label_index -1 must be"),
        ("label", "run\nevil", "label 'run\\nevil' must be a string without control characters"),
        ("label", 7, "label 7 must be a string"),
        ("video_id", "run/a b", "video_id 'run/a b' contains whitespace ' '"),
        ("video_id", "run/a\tb", "video_id 'run/a\\tb' contains a control character '\\t'"),
        ("path", "run/a\x01.avi", "path 'run/a\\x01.avi' contains a control character"),
    ],
)
def test_read_manifest_checks_every_value_that_becomes_a_path_or_list_line(
    tmp_path: Path, field: str, value: object, cause: str
) -> None:
    good = {"video_id": "run/a", "path": "run/a.avi", "label": "run", "label_index": 0}
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(good) + "\n" + json.dumps({**good, field: value}) + "\n")
    with pytest.raises(ManifestError) as err:
        read_manifest(manifest)
    assert str(err.value).startswith(f"{manifest}:2: {cause}")
    assert "\n" not in str(err.value)


def test_split_key_cannot_write_a_list_outside_out(tmp_path: Path) -> None:
    # the id makes OUT/train_splitX a folder, the split key climbs out of OUT from there
    write_video(tmp_path / "v" / "a.avi", moving_shapes(2, 32, 32))
    row = {"video_id": "train_splitX/a", "path": "a.avi", "label_index": 0}
    manifest = tmp_path / "v" / "m.jsonl"
    manifest.write_text(json.dumps({**row, "splits": {"X/../../victim": "train"}}) + "\n")
    out = tmp_path / "work" / "out"
    result = CliRunner().invoke(main, ["extract", str(manifest), "-o", str(out), "-q"])
    assert result.exit_code == 1
    assert result.output == (
        f"Error: {manifest}:1: split key 'X/../../victim' must be a split number (digits only)\n"
    )
    assert not (tmp_path / "work" / "victim.txt").exists() and not out.exists()


def test_nested_video_ids_are_refused_naming_both(tmp_path: Path) -> None:
    rows = [{"video_id": "a", "path": "a.avi"}, {"video_id": "a/b", "path": "a/b.avi"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ManifestError) as err:
        read_manifest(manifest)
    assert str(err.value) == (
        f"{manifest}:2: video id 'a/b' lies inside the output folder of video id 'a' (line 1)"
    )
    videos = tmp_path / "v"
    write_video(videos / "a.avi", moving_shapes(2, 32, 32))
    write_video(videos / "a" / "b.avi", moving_shapes(2, 32, 32))
    for args in (["index", str(videos), "-o", str(tmp_path / "x.jsonl")],
                 ["extract", str(videos), "-o", str(tmp_path / "out"), "-q"]):  # fmt: skip
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, result.output
        assert result.output.count("\n") == 1
        assert "video ids 'a' and 'a/b' clash" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.jsonl").exists()


def test_unreadable_class_folder_is_an_error_not_a_skip(tmp_path: Path, monkeypatch) -> None:
    for rel in ("a_run/1.avi", "b_jump/2.avi", "c_wave/3.avi"):
        _touch(tmp_path / "v", rel)
    blocked = tmp_path / "v" / "b_jump"
    real_scandir = os.scandir

    def scandir(path: object = "."):  # as an unreadable folder behaves (tests run as root)
        if Path(os.fsdecode(path)) == blocked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(ManifestError) as err:
        build_manifest(tmp_path / "v")  # c_wave would take b_jump's label index 1
    assert str(err.value) == f"{blocked}: cannot read folder (Permission denied)"
    for args in (["index", str(tmp_path / "v"), "-o", str(tmp_path / "m.jsonl")],
                 ["extract", str(tmp_path / "v"), "-o", str(tmp_path / "o"), "-q"]):  # fmt: skip
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1
        assert result.output == f"Error: {blocked}: cannot read folder (Permission denied)\n"


def test_symlink_loops_are_reported_not_followed(tmp_path: Path) -> None:
    _touch(tmp_path / "v", "walk/a.avi")
    (tmp_path / "v" / "walk" / "self").symlink_to(tmp_path / "v")
    with pytest.raises(ManifestError) as err:
        build_manifest(tmp_path / "v")
    assert str(err.value) == (
        f"{tmp_path / 'v' / 'walk' / 'self'}: same folder (device and inode) as "
        f"{tmp_path / 'v'}: a symlink loop or a second link; not followed"
    )
    (tmp_path / "v" / "walk" / "self").unlink()
    _touch(tmp_path / "elsewhere", "jump/b.avi")  # a class folder on another disk still indexes
    (tmp_path / "v" / "jump").symlink_to(tmp_path / "elsewhere" / "jump")
    assert [e.video_id for e in build_manifest(tmp_path / "v")] == ["jump/b", "walk/a"]
