"""HDF5 shards: bytes round trip, same frames as folders, size splitting, resume after kill -9,
`extract --format hdf5`, CLI errors, DataLoader workers."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_flowprep_extract import tree_bytes
from torch.utils.data import DataLoader, Dataset

import flowprep.shards as shards
from flowprep.cli import main
from flowprep.extract import run_batch
from flowprep.extract_hdf5 import extract_to_shards
from flowprep.manifest import build_manifest
from flowprep.reader import ReaderError, ShardReader, open_reader
from flowprep.settings import ExtractSettings
from flowprep.shards import pack, parse_size
from flowprep.verify import verify
from pipelines.synthetic import moving_shapes, write_video


@pytest.fixture
def frames(make_frame_folder) -> Path:
    make_frame_folder("c1/v_a", num_frames=5, label_index=0, seed=1)
    make_frame_folder("c1/v_b", num_frames=4, label_index=0, seed=2)
    make_frame_folder("c2/v_c", num_frames=6, label="b", label_index=1, seed=3)
    return make_frame_folder("v_d", num_frames=3, flows=False, seed=4).parent


def test_parse_size() -> None:
    assert parse_size("4GB") == 4 * 10**9 and parse_size("500MB") == 500 * 10**6
    assert parse_size("1.5kb") == 1500 and parse_size("1024") == 1024
    with pytest.raises(ValueError, match="not a size: '4 parsecs'"):
        parse_size("4 parsecs")


def test_pack_round_trip_bytes_and_frames(frames: Path, tmp_path: Path) -> None:
    index = pack(frames, tmp_path / "s", shard_size=3000)
    assert sorted(index["videos"]) == ["c1/v_a", "c1/v_b", "c2/v_c", "v_d"]
    assert len(set(index["videos"].values())) >= 2  # the size limit splits the shards
    assert not list((tmp_path / "s").glob("*.tmp"))
    folders, packed = open_reader(frames), open_reader(tmp_path / "s")
    assert isinstance(packed, ShardReader) and packed.video_ids == folders.video_ids
    for vid in folders.video_ids:
        f, s = folders[vid], packed[vid]
        assert s.meta == f.meta and (s.num_frames, s.num_flows) == (f.num_frames, f.num_flows)
        for kind, n in (("img", f.num_frames), ("flow_x", f.num_flows), ("flow_y", f.num_flows)):
            assert s.count(kind) == n
            for i in range(n):
                assert s.raw(kind, i) == (frames / vid / f"{kind}_{i + 1:05d}.jpg").read_bytes()
        assert np.array_equal(s.rgb(range(f.num_frames)), f.rgb(range(f.num_frames)))
        if f.num_flows:
            assert np.array_equal(s.flow([f.num_flows - 1, 0]), f.flow([f.num_flows - 1, 0]))
    flow = packed["c1/v_a"].flow([2])
    assert flow.shape == (1, 24, 32, 2) and abs(int(flow[0, 5, 0, 0]) - 10) <= 3  # ramp + 5k
    with pytest.raises(ReaderError, match="v_d: flow index 0 out of range"):
        packed["v_d"].flow([0])
    with pytest.raises(ReaderError, match=r"cannot read img\[5\] \(index 5 out of range 0..4\)"):
        packed["c1/v_a"].raw("img", 5)
    with pytest.raises(KeyError, match="no packed video 'nope'"):
        packed["nope"]


def interrupt_third_pack(monkeypatch) -> list[str]:
    """Make the third `pack_video` call raise KeyboardInterrupt; return the ids it was called on."""
    real, calls = shards.pack_video, []

    def dies_on_third(folder, vid, shard):
        calls.append(vid)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(folder, vid, shard)

    monkeypatch.setattr(shards, "pack_video", dies_on_third)
    return calls


def test_interrupted_pack_resumes(frames: Path, tmp_path: Path, monkeypatch) -> None:
    calls = interrupt_third_pack(monkeypatch)
    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        pack(frames, out, shard_size=1)  # one video per shard
    assert sorted(p.name for p in out.iterdir()) == [
        "index.json", "shard_00000.h5", "shard_00001.h5", "shard_00002.h5.tmp"
    ]  # fmt: skip
    monkeypatch.undo()  # pack_video is real again
    calls.clear()
    index = pack(frames, out, shard_size=1)
    assert len(index["videos"]) == 4 and not list(out.glob("*.tmp"))
    assert sorted(set(index["videos"].values())) == [f"shard_{i:05d}.h5" for i in range(4)]
    r = open_reader(out)
    assert r["v_d"].rgb([2]).shape == (1, 24, 32, 3)
    assert pack(frames, out) == index  # nothing left to do


def shards_named(*numbers: int) -> list[str]:
    return [shards.shard_name(n) for n in numbers]


# Runs `flowprep ARGS...` in a fresh process that SIGKILLs itself on the N-th call of
# flowprep.shards.FUNCTION: a real kill -9 at a chosen point, no cleanup code runs.
_KILLER = """
import os, signal, sys
import flowprep.shards as shards
function, nth = sys.argv[1], int(sys.argv[2])
real, calls = getattr(shards, function), []
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(shards, function, dying)
from flowprep.cli import main
main(sys.argv[3:])
"""


def test_kill_9_mid_pack_then_rerun_is_byte_identical(make_frame_folder, tmp_path: Path) -> None:
    for v in range(6):
        make_frame_folder(f"c{v % 2}/v_{v}", num_frames=5, seed=v)
    frames = tmp_path / "frames"
    one = max(shards._video_bytes(frames / f"c{v % 2}/v_{v}") for v in range(6))
    size = str(int(2.5 * one))  # two videos per shard
    pack_cmd = ["pack", str(frames), "-o", str(tmp_path / "out"), "--shard-size", size]
    runner = CliRunner()
    res = runner.invoke(main, [*pack_cmd[:3], str(tmp_path / "ref"), *pack_cmd[4:]])
    assert res.exit_code == 0 and "6 videos in 3 shards" in res.output
    # 1: killed while the second shard holds one video; 2: killed after the rerun renamed the
    # second shard but before it wrote the index (the shard exists, unindexed)
    for function, nth in (("pack_video", 4), ("write_json_atomic", 1)):
        run = subprocess.run([sys.executable, "-c", _KILLER, function, str(nth), *pack_cmd])
        assert run.returncode == -9
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["index.json", *shards_named(0, 1)]
    assert set(json.loads((out / "index.json").read_text())["videos"].values()) == {
        "shard_00000.h5"
    }
    res = runner.invoke(main, pack_cmd)
    assert res.exit_code == 0, res.output
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")


def test_repacks_a_video_extracted_again(frames: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    pack(frames, out)
    (frames / "c1/v_b/.done").write_text(json.dumps({"settings_hash": "new"}))
    (frames / "c1/v_b/img_00001.jpg").write_bytes((frames / "c1/v_a/img_00001.jpg").read_bytes())
    index = pack(frames, out)
    assert index["videos"]["c1/v_b"] == "shard_00001.h5" and index["stamps"]["c1/v_b"] == {
        "settings_hash": "new"
    }
    assert {v for v, s in index["videos"].items() if s == "shard_00000.h5"} == {
        "c1/v_a", "c2/v_c", "v_d"
    }  # fmt: skip
    got = open_reader(out)["c1/v_b"].raw("img", 0)
    assert got == (frames / "c1/v_a/img_00001.jpg").read_bytes()


def test_pack_cli_and_one_line_errors(frames: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(
        main, ["pack", str(frames), "-o", str(tmp_path / "s"), "--shard-size", "1MB"]
    )
    assert res.exit_code == 0, res.output
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert set(index["videos"].values()) == {"shard_00000.h5"}
    res = runner.invoke(main, ["pack", str(frames), "-o", str(tmp_path / "t"), "--shard-size", "x"])
    assert res.exit_code == 2 and "not a size: 'x'" in res.output
    (frames / "c1/v_b/flow_y_00002.jpg").unlink()
    res = runner.invoke(main, ["pack", str(frames), "-o", str(tmp_path / "t")])
    assert res.exit_code == 1 and res.output == (
        f"Error: {frames / 'c1/v_b/flow_y_00002.jpg'}: cannot read (No such file or directory)\n"
    )
    assert not (tmp_path / "t" / "shard_00000.h5").exists()  # only the temporary was written
    (tmp_path / "s" / "index.json").write_text("{")
    res = runner.invoke(main, ["pack", str(frames), "-o", str(tmp_path / "s")])
    assert res.exit_code == 1 and res.output.startswith(
        f"Error: {tmp_path / 's' / 'index.json'}: unreadable shard index ("
    )
    assert len(res.output.splitlines()) == 1


def test_two_runs_never_write_one_shard_directory(frames: Path, tmp_path: Path) -> None:
    first = shards.ShardWriter(frames, tmp_path / "s", ["c1/v_a"], 10**9)
    first.add("c1/v_a", True)  # still open: its shard is not written yet
    with pytest.raises(shards.ShardError, match="another flowprep run is writing shards here"):
        pack(frames, tmp_path / "s")
    assert list(first.close()["videos"]) == ["c1/v_a"]
    assert len(pack(frames, tmp_path / "s")["videos"]) == 4  # the lock went with close()


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    for i in range(5):
        write_video(root / f"c{i % 2}" / f"clip{i}.avi", moving_shapes(5, 48, 64, seed=i))
    (root / "c0" / "broken.avi").write_bytes(b"not a video")
    return root


SETTINGS = ExtractSettings(short_side=0, modality="both", flow_backend="opencv")


def test_extract_format_hdf5_writes_what_extract_then_pack_writes(
    videos: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    args = ["--short-side", "0", "--modality", "both", "--flow-backend", "opencv", "-q"]
    res = runner.invoke(main, ["extract", str(videos), "-o", str(tmp_path / "f"), *args])
    assert res.exit_code == 3  # the broken video
    pack_cmd = ["pack", str(tmp_path / "f"), "-o", str(tmp_path / "p"), "--shard-size", "30KB"]
    assert runner.invoke(main, pack_cmd).exit_code == 0
    direct = ["extract", str(videos), "-o", str(tmp_path / "h"), "--format", "hdf5", *args]
    res = runner.invoke(main, [*direct, "--shard-size", "30KB"])
    assert res.exit_code == 3 and "5 succeeded (5 extracted, 0 already" in res.output
    packed, written = tree_bytes(tmp_path / "p"), tree_bytes(tmp_path / "h")
    assert len([n for n in packed if n.endswith(".h5")]) >= 2
    reports = {n: b for n, b in tree_bytes(tmp_path / "f").items() if "/" not in n}
    assert sorted(reports) == ["all.txt", "all_flow.txt", "failures.jsonl"]
    assert written == {**packed, **reports}  # shards, index and reports; no .frames left
    res = runner.invoke(main, [*direct, "--shard-size", "30KB"])
    assert "5 succeeded (0 extracted, 5 already done), 1 failed" in res.output
    assert tree_bytes(tmp_path / "h") == written


def test_interrupted_extract_to_shards_resumes(videos: Path, tmp_path: Path, monkeypatch) -> None:
    entries = build_manifest(videos)
    reference = tmp_path / "ref"
    extract_to_shards(entries, videos, reference, SETTINGS, shard_size=1)  # one video per shard
    interrupt_third_pack(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        extract_to_shards(entries, videos, out, SETTINGS, shard_size=1)
    assert (out / "shard_00001.h5").exists() and (out / shards.WORK_DIR).is_dir()
    monkeypatch.undo()  # pack_video is real again
    # a shard is written once the next video is known: clip0 and clip2 are packed, clip4 and
    # clip1 were finished folders in OUT/.frames, clip3 was never started
    results = extract_to_shards(entries, videos, out, SETTINGS, shard_size=1)
    assert {r.video_id: r.status for r in results} == {
        "c0/broken": "failed", "c0/clip0": "skipped", "c0/clip2": "skipped",
        "c0/clip4": "skipped", "c1/clip1": "skipped", "c1/clip3": "done",
    }  # fmt: skip
    assert tree_bytes(out) == tree_bytes(reference)


def test_settings_change_redoes_packed_videos(videos: Path, tmp_path: Path) -> None:
    entries = build_manifest(videos)
    out = tmp_path / "out"
    extract_to_shards(entries, videos, out, SETTINGS)
    smaller = ExtractSettings(short_side=24, modality="both", flow_backend="opencv")
    results = extract_to_shards(entries, videos, out, smaller)
    assert [r.status for r in results].count("done") == 5
    assert set(json.loads((out / "index.json").read_text())["videos"].values()) == {
        "shard_00001.h5"
    }
    assert open_reader(out)["c0/clip0"].rgb([0]).shape == (1, 24, 32, 3)
    run_batch(entries, videos, tmp_path / "f", smaller)
    assert (out / "all.txt").read_bytes() == (tmp_path / "f" / "all.txt").read_bytes()


class _Clips(Dataset):
    def __init__(self, root: Path):
        self.reader = open_reader(root)
        self.reader["c1/v_a"].rgb([0])  # opens a shard in the parent before the fork

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> torch.Tensor:
        vid = ["c1/v_a", "c1/v_b", "c2/v_c"][i % 3]
        return torch.from_numpy(self.reader[vid].flow([i % 3]))


def test_shards_in_dataloader_workers(frames: Path, tmp_path: Path) -> None:
    pack(frames, tmp_path / "s", shard_size=3000)
    dataset = _Clips(tmp_path / "s")
    got = torch.cat(list(DataLoader(dataset, batch_size=2, num_workers=2)))
    direct = open_reader(frames)
    want = [direct[["c1/v_a", "c1/v_b", "c2/v_c"][i % 3]].flow([i % 3])[0] for i in range(6)]
    assert torch.equal(got[:, 0], torch.from_numpy(np.stack(want)))
    assert dataset.reader._files  # the parent's handle is still open and still works
    assert torch.equal(dataset[0], got[0])
    copy = pickle.loads(pickle.dumps(dataset.reader))  # spawn-style workers: no handle crosses
    assert copy._files == {} and np.array_equal(copy["c2/v_c"].rgb([1]), direct["c2/v_c"].rgb([1]))


def test_pack_copies_the_annotation_lists(frames: Path, tmp_path: Path) -> None:
    (frames / "train_split1.txt").write_text("c1/v_a 5 0\n")
    (frames / "test_split1.txt").write_text("c2/v_c 6 1\n")
    (frames / "notes.txt").write_text("not a list\n")
    pack(frames, tmp_path / "s")
    assert (tmp_path / "s" / "train_split1.txt").read_text() == "c1/v_a 5 0\n"
    assert (tmp_path / "s" / "test_split1.txt").read_text() == "c2/v_c 6 1\n"
    assert not (tmp_path / "s" / "notes.txt").exists()


def test_repack_drops_shards_the_index_no_longer_names(frames: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    pack(frames, out, shard_size=1)  # one video per shard
    (frames / "c1/v_b/.done").write_text(json.dumps({"settings_hash": "new"}))
    index = pack(frames, out, shard_size=1)
    assert index["videos"]["c1/v_b"] == "shard_00004.h5"
    assert sorted(p.name for p in out.glob("*.h5")) == shards_named(0, 2, 3, 4)  # 1 is gone
    assert verify(out) == []


def test_pack_deletes_lists_the_frames_no_longer_have(frames: Path, tmp_path: Path) -> None:
    (frames / "train_split1.txt").write_text("c1/v_a 5 0\n")
    (frames / "test_split1.txt").write_text("c2/v_c 6 1\n")
    pack(frames, tmp_path / "s")
    (frames / "train_split1.txt").unlink()
    (frames / "test_split1.txt").write_text("c1/v_a 5 0\nc2/v_c 6 1\n")
    pack(frames, tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").glob("*.txt")) == ["test_split1.txt"]


def test_planted_frames_symlink_is_refused(videos: Path, tmp_path: Path) -> None:
    victim, out = tmp_path / "victim", tmp_path / "h"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me\n")
    out.mkdir()
    (out / shards.WORK_DIR).symlink_to(victim)
    res = CliRunner().invoke(
        main, ["extract", str(videos), "-o", str(out), "--format", "hdf5", "-q"]
    )
    assert res.exit_code == 1
    assert res.output == (
        f"Error: {out / shards.WORK_DIR} is a symlink; flowprep will not follow it to hold frame "
        "folders waiting for their shard (remove it and rerun)\n"
    )
    assert [p.name for p in victim.iterdir()] == ["precious.txt"]
