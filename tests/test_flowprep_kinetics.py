"""flowprep index on Kinetics-style CSV annotations: clips found by name, missing ones listed."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from flowprep.cli import main
from flowprep.kinetics import clip_name, index_kinetics
from flowprep.manifest import ManifestError, build_manifest, read_manifest

TRAIN = """label,youtube_id,time_start,time_end,split,is_cc
abseiling,--GkrdYZ9Tc,0,10,train,0
air drumming,-VtLx-mcPds,14,24,train,0
"passing American football (in game)",Ab_c-1,35,45,train,1
abseiling,zzzzzzzzzzz,5,15,train,0
"""
VALIDATE = """label,youtube_id,time_start,time_end,split,is_cc
air drumming,val-1,100,110,val,0
"""
TEST = """youtube_id,time_start,time_end,split
tst_1,0,10,test
"""


def make_corpus(tmp_path: Path) -> tuple[Path, Path]:
    """Annotations in ann/, clips under videos/ in a class folder, a split folder and flat;
    the clip `zzzzzzzzzzz_000005_000015` was never downloaded."""
    ann, videos = tmp_path / "ann", tmp_path / "videos"
    ann.mkdir()
    (ann / "train.csv").write_text(TRAIN)
    (ann / "validate.csv").write_text(VALIDATE)
    (ann / "test.csv").write_text(TEST)
    (ann / "readme.txt").write_text("not an annotation")
    for rel in (
        "abseiling/--GkrdYZ9Tc_000000_000010.mp4",
        "train/-VtLx-mcPds_000014_000024.mp4",
        "Ab_c-1_000035_000045.mkv",
        "val/val-1_000100_000110.mp4",
        "test/tst_1_000000_000010.mp4",
    ):
        (videos / rel).parent.mkdir(parents=True, exist_ok=True)
        (videos / rel).write_bytes(b"")
    return videos, ann


def test_kinetics_csvs_index_with_missing_clips_listed(tmp_path):
    videos, ann = make_corpus(tmp_path)
    out = tmp_path / "manifest.jsonl"
    r = CliRunner().invoke(main, ["index", str(videos), "-s", str(ann), "-o", str(out)])
    assert r.exit_code == 0, r.output
    missing_file = tmp_path / "manifest_missing.txt"
    assert r.output.strip() == (
        f"indexed 5 videos in 3 classes -> {out}; 1 listed clips are missing: {missing_file}"
    )
    assert missing_file.read_text() == f"zzzzzzzzzzz_000005_000015 {ann / 'train.csv'}:5\n"
    entries = {e.video_id: e for e in read_manifest(out)}  # the manifest reader's checks pass
    assert set(entries) == {
        "--GkrdYZ9Tc_000000_000010", "-VtLx-mcPds_000014_000024", "Ab_c-1_000035_000045",
        "tst_1_000000_000010", "val-1_000100_000110",
    }  # fmt: skip
    e = entries["-VtLx-mcPds_000014_000024"]
    assert (e.path, e.label, e.label_index, e.splits) == (
        "train/-VtLx-mcPds_000014_000024.mp4", "air drumming", 1, {"1": "train"}
    )  # fmt: skip
    # labels sorted over all CSVs (a missing clip's label keeps its index): abseiling 0,
    # air drumming 1, passing American football (in game) 2
    assert entries["Ab_c-1_000035_000045"].label_index == 2
    assert entries["Ab_c-1_000035_000045"].path == "Ab_c-1_000035_000045.mkv"
    assert entries["val-1_000100_000110"].splits == {"1": "test"}  # val -> the test list
    t = entries["tst_1_000000_000010"]
    assert (t.label, t.label_index, t.splits) == (None, None, {"1": "unused"})
    # everything downloaded later: the stale missing list goes
    (videos / "zzzzzzzzzzz_000005_000015.mp4").write_bytes(b"")
    r = CliRunner().invoke(main, ["index", str(videos), "-s", str(ann), "-o", str(out)])
    assert r.exit_code == 0 and "missing" not in r.output and not missing_file.exists()


def test_clip_names_follow_the_downloaders():
    assert clip_name("--GkrdYZ9Tc", 0, 10) == "--GkrdYZ9Tc_000000_000010"


BAD_ROWS = [
    ("abseiling,../etc,0,10,train", "youtube_id '../etc' must be 1-64 letters, digits, _ or -"),
    ("abseiling,a/b,0,10,train", "youtube_id 'a/b' must be 1-64 letters, digits, _ or -"),
    ("abseiling,abc,1.5,10,train", "time_start '1.5' must be a non-negative integer"),
    ("abseiling,abc,-3,10,train", "time_start '-3' must be a non-negative integer"),
    ("abseiling,abc,10,10,train", "time_end 10 must be after time_start 10"),
    ("a/b,abc,0,10,train", "label 'a/b' must be letters, digits, spaces and ()'-,.&+:;!? "
     "(no '/', '..' or control characters)"),
    ("..,abc,0,10,train", "label '..' must be letters"),
    ("bad\x01label,abc,0,10,train", "label 'bad\\x01label' must be letters"),
    ("abseiling,abc,0,10,dev", "split 'dev' must be one of train, val, validate, test"),
    (",abc,0,10,train", "a train clip needs a label"),
    ("abseiling,abc,0,10", "4 fields, the header has 5"),
]  # fmt: skip


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_every_value_is_checked_with_file_and_line(tmp_path, row, message):
    ann, videos = tmp_path / "ann", tmp_path / "videos"
    ann.mkdir()
    videos.mkdir()
    csv = ann / "train.csv"
    csv.write_text(f"label,youtube_id,time_start,time_end,split\nok,x1,0,10,train\n{row}\n")
    r = CliRunner().invoke(main, ["index", str(videos), "-s", str(ann), "-o", str(tmp_path / "m")])
    assert r.exit_code == 1
    assert r.output.startswith(f"Error: {csv}:3: {message}")
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_structural_problems_are_one_line(tmp_path):
    ann, videos = tmp_path / "ann", tmp_path / "videos"
    ann.mkdir()
    videos.mkdir()
    csv = ann / "a.csv"
    csv.write_text("label,youtube_id,time_start,split\nx,abc,0,train\n")
    with pytest.raises(ManifestError, match=r"a.csv:1: no column 'time_end' in the header$"):
        build_manifest(videos, ann)
    csv.write_text("label,youtube_id,time_start,time_end,split\nx,abc,0,10,train\n")
    (ann / "b.csv").write_text("youtube_id,time_start,time_end,split,label\nabc,0,10,val,x\n")
    with pytest.raises(ManifestError, match=r"b.csv:2: clip 'abc_000000_000010' is already "):
        build_manifest(videos, ann, "kinetics")
    (ann / "b.csv").unlink()
    (videos / "abc_000000_000010.mp4").write_bytes(b"")
    (videos / "x").mkdir()
    (videos / "x" / "abc_000000_000010.webm").write_bytes(b"")
    with pytest.raises(ManifestError, match="two files for clip 'abc_000000_000010'"):
        index_kinetics(videos, ann)
    (videos / "x" / "abc_000000_000010.webm").unlink()
    entries, missing = index_kinetics(videos, ann)
    assert [e.video_id for e in entries] == ["abc_000000_000010"] and missing == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ManifestError, match="nor CSV files with a youtube_id column"):
        build_manifest(videos, empty)


def test_a_class_folder_with_spaces_is_one_line(tmp_path):
    """Manifest paths hold no whitespace (they fill list lines): such a folder is named."""
    ann, videos = tmp_path / "ann", tmp_path / "videos"
    ann.mkdir()
    (ann / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split\na b,x1,0,10,train\n"
    )
    (videos / "a b").mkdir(parents=True)
    (videos / "a b" / "x1_000000_000010.mp4").write_bytes(b"")
    r = CliRunner().invoke(main, ["index", str(videos), "-s", str(ann), "-o", str(tmp_path / "m")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "path 'a b/x1_000000_000010.mp4' contains whitespace ' '" in r.output
