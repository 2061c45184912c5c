"""verify: clean corpora pass; truncation, flipped bytes, missing files, label drift reported.

The corruption tests run with both JPEG decoders (simplejpeg, and the cv2 fallback), so what
counts as corrupt does not depend on which one is installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowprep.cli import main
from flowprep.shards import pack
from flowprep.verify import Problem, verify


@pytest.fixture
def frames(make_frame_folder, tmp_path: Path) -> Path:
    make_frame_folder("c1/v_a", num_frames=4, seed=1, height=48, width=64)
    make_frame_folder("c2/v_b", num_frames=3, label="b", label_index=1, seed=2)
    return tmp_path / "frames"


def _flip(path: Path, start: int, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    data[start : start + n] = bytes(b ^ 0x5A for b in data[start : start + n])
    path.write_bytes(bytes(data))


def _manifest(path: Path, rows: list[tuple[str, str, int]]) -> Path:
    lines = [
        json.dumps({"video_id": v, "path": f"{v}.avi", "label": lab, "label_index": i})
        for v, lab, i in rows
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_clean_folders_and_shards_verify(frames: Path, tmp_path: Path, decoder: str) -> None:
    pack(frames, tmp_path / "s")
    manifest = _manifest(tmp_path / "m.jsonl", [("c1/v_a", "a", 0), ("c2/v_b", "b", 1)])
    assert verify(frames, manifest) == [] and verify(tmp_path / "s", manifest) == []


def test_flipped_and_truncated_jpegs_and_missing_frame_in_folders(
    frames: Path, decoder: str
) -> None:
    jpeg = frames / "c1/v_a/img_00002.jpg"
    _flip(jpeg, len(jpeg.read_bytes()) // 2)
    cut = frames / "c1/v_a/flow_x_00003.jpg"
    cut.write_bytes(cut.read_bytes()[:-40])
    (frames / "c2/v_b/flow_y_00002.jpg").unlink()
    problems = [str(p) for p in verify(frames)]
    assert len(problems) == 4, problems
    assert problems[0].startswith("c1/v_a: img_00002.jpg: not a decodable JPEG (")
    assert problems[1].startswith("c1/v_a: flow_x_00003.jpg: not a decodable JPEG (")
    assert problems[2:] == [
        "c2/v_b: 1 flow_y files, meta says 2",
        "c2/v_b: flow_y_00002.jpg: cannot read (No such file or directory)",
    ]


def test_flipped_bytes_inside_a_shard(frames: Path, tmp_path: Path, decoder: str) -> None:
    pack(frames, tmp_path / "s")
    shard = tmp_path / "s" / "shard_00000.h5"
    jpeg = (frames / "c1/v_a/img_00003.jpg").read_bytes()
    at = shard.read_bytes().find(jpeg)
    assert at > 0  # stored as is, no re-encoding
    _flip(shard, at + len(jpeg) // 2)
    problems = [str(p) for p in verify(tmp_path / "s")]
    assert len(problems) == 2, problems
    assert problems[0].startswith("c1/v_a: shard_00000.h5:img: CRC32 ")
    assert problems[0].endswith("(bytes changed)")
    assert problems[1].startswith("c1/v_a: shard_00000.h5:img[2]: CRC32 ")  # the JPEG's own CRC
    assert problems[1].endswith("(bytes changed)")


def test_a_changed_byte_that_still_decodes_is_found(frames: Path, tmp_path: Path) -> None:
    pack(frames, tmp_path / "s")
    shard = tmp_path / "s" / "shard_00000.h5"
    jpeg = (frames / "c2/v_b/flow_x_00001.jpg").read_bytes()
    at = shard.read_bytes().find(jpeg)
    _flip(shard, at + jpeg.find(b"JFIF"), n=1)  # the APP0 header: every decoder accepts it
    problems = [str(p) for p in verify(tmp_path / "s")]
    assert len(problems) == 2 and problems[0].startswith("c2/v_b: shard_00000.h5:flow_x: CRC32")
    assert problems[1].startswith("c2/v_b: shard_00000.h5:flow_x[0]: CRC32")


def test_truncated_shard_is_reported_not_raised(frames: Path, tmp_path: Path) -> None:
    pack(frames, tmp_path / "s")
    shard = tmp_path / "s" / "shard_00000.h5"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    problems = verify(tmp_path / "s")
    assert [p.where for p in problems] == ["c1/v_a", "c2/v_b"]
    assert all(f"{shard}: cannot open shard (" in p.message for p in problems), problems
    res = CliRunner().invoke(main, ["verify", str(tmp_path / "s")])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 3 and lines[-1] == f"Error: 2 problems found in {tmp_path / 's'}"


def test_corrupt_shards_never_crash_or_hang(frames: Path, tmp_path: Path) -> None:
    """Flip 16 bytes at 60 places across a shard (HDF5 metadata and data), in a child process so
    that a crash or a hang fails the test: verify returns each time, with one-line reports."""
    pack(frames, tmp_path / "s")
    shard = tmp_path / "s" / "shard_00000.h5"
    size = shard.stat().st_size
    script = """
import sys
from pathlib import Path
from flowprep.verify import verify
shard, original = Path(sys.argv[1]), Path(sys.argv[1]).read_bytes()
for at in map(int, sys.argv[2:]):
    data = bytearray(original)
    data[at : at + 16] = bytes(b ^ 0x5A for b in data[at : at + 16])
    shard.write_bytes(bytes(data))
    for problem in verify(shard.parent):
        print(at, problem)
"""
    places = [size * k // 60 for k in range(60)]
    res = subprocess.run(
        [sys.executable, "-c", script, str(shard), *map(str, places)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    found = {int(line.split()[0]) for line in res.stdout.splitlines()}
    assert len(found) >= 30, f"only {len(found)} of 60 corruptions found"


def test_manifest_and_meta_disagreement(frames: Path, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "m.jsonl", [("c1/v_a", "a", 3), ("c9/v_z", "z", 9)])
    meta_path = frames / "c1/v_a/meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "source": "elsewhere/v_a.avi", "width": 65}))
    problems = verify(frames, manifest)
    assert problems[:2] == [
        Problem("c1/v_a", "img_00001.jpg: 64x48, meta says 65x48"),
        Problem("c1/v_a", "img_00002.jpg: 64x48, meta says 65x48"),
    ]  # ... and the other 8 JPEGs of c1/v_a
    assert problems[10:] == [
        Problem("c1/v_a", "label_index 0, manifest says 3"),
        Problem("c1/v_a", "source 'elsewhere/v_a.avi', manifest says 'c1/v_a.avi'"),
        Problem("c2/v_b", "not in the manifest"),
        Problem("c9/v_z", "in the manifest but not found"),
    ]
    (tmp_path / "bad.jsonl").write_text('{"video_id": "x"}\n')
    assert [str(p) for p in verify(frames, tmp_path / "bad.jsonl")] == [
        f"manifest: {tmp_path / 'bad.jsonl'}:1: not a manifest line ('path')"
    ]


def test_verify_cli_exit_codes(frames: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    pack(frames, tmp_path / "s")
    manifest = _manifest(tmp_path / "m.jsonl", [("c1/v_a", "a", 0), ("c2/v_b", "b", 1)])
    for corpus in (frames, tmp_path / "s"):
        res = runner.invoke(main, ["verify", str(corpus), "--manifest", str(manifest)])
        assert res.exit_code == 0 and res.output == f"{corpus}: all videos verified\n"
    (frames / "c1/v_a/img_00001.jpg").write_bytes(b"not a jpeg")
    res = runner.invoke(main, ["verify", str(frames)])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("c1/v_a: img_00001.jpg: not a decodable JPEG")
    assert lines[-1] == f"Error: 1 problems found in {frames}"


def test_nothing_to_verify_is_a_failure(frames: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "clip.avi").write_bytes(b"a video, never extracted")
    for folder in (tmp_path / "empty", tmp_path / "videos"):
        res = runner.invoke(main, ["verify", str(folder)])
        assert res.exit_code == 1
        assert res.output == (
            f"{folder}: no videos found (0 finished video folders)\n"
            f"Error: 1 problems found in {folder}\n"
        )
    pack(frames, tmp_path / "s")
    (tmp_path / "s" / "index.json").unlink()  # shards without their index: 0 videos read
    assert [str(p) for p in verify(tmp_path / "s")] == [
        f"{tmp_path / 's'}: no videos found (0 finished video folders)",
        f"{tmp_path / 's' / 'shard_00000.h5'}: shard file not referenced by index.json",
    ]


def test_shard_files_the_index_does_not_name_fail(frames: Path, tmp_path: Path) -> None:
    pack(frames, tmp_path / "s")
    stray = tmp_path / "s" / "shard_00007.h5"
    stray.write_bytes((tmp_path / "s" / "shard_00000.h5").read_bytes())
    assert [str(p) for p in verify(tmp_path / "s")] == [
        f"{stray}: shard file not referenced by index.json"
    ]
    res = CliRunner().invoke(main, ["verify", str(tmp_path / "s")])
    assert res.exit_code == 1


def test_verify_and_pack_report_progress(make_frame_folder, tmp_path):
    for v in ("c1/v_a", "c1/v_b", "c2/v_c"):
        make_frame_folder(v, num_frames=3)
    frames, seen = tmp_path / "frames", {"start": [], "videos": [], "packed": []}
    problems = verify(frames, on_start=seen["start"].append, on_video=seen["videos"].append)
    assert problems == [] and seen["start"] == [3]
    assert seen["videos"] == ["c1/v_a", "c1/v_b", "c2/v_c"]
    pack(frames, tmp_path / "s", on_start=seen["start"].append, on_packed=seen["packed"].extend)
    assert seen["start"] == [3, 3] and seen["packed"] == ["c1/v_a", "c1/v_b", "c2/v_c"]
    for command in (
        ["verify", str(frames), "-q"],
        ["pack", str(frames), "-o", str(tmp_path / "s"), "-q"],
    ):
        r = CliRunner().invoke(main, command)
        assert r.exit_code == 0 and "\r" not in r.output, r.output  # no bar with -q
