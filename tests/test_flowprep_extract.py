"""`flowprep extract`: frame folders, metadata, split lists, failures, resume and kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from bad_videos import SHARED, make_bad_videos
from click.testing import CliRunner
from PIL import Image

from flowprep import ownership
from flowprep.atomic import lock_exclusive
from flowprep.cli import EXIT_SOME_FAILED, main
from flowprep.extract import extract_video, run_batch
from flowprep.manifest import VideoEntry, build_manifest, write_manifest
from flowprep.ownership import claim_output
from flowprep.settings import ExtractSettings
from pipelines.synthetic import moving_shapes, write_video


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under root (dot-files included) -> its bytes."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A folder-per-class corpus: normal, 1-frame, odd-sized and portrait clips."""
    root = tmp_path / "videos"
    write_video(root / "walk" / "moving.avi", moving_shapes(12, 120, 160, seed=0))
    write_video(root / "walk" / "single.mp4", moving_shapes(1, 64, 64, seed=1), codec="libx264")
    write_video(root / "wave" / "odd.mkv", moving_shapes(5, 61, 97, seed=2), codec="ffv1")
    write_video(root / "wave" / "portrait.mp4", moving_shapes(4, 160, 90, seed=3), codec="libx264")
    return root


def test_extract_writes_frames_meta_and_lists(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["extract", str(corpus), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert "4 succeeded (4 extracted, 0 already done), 0 failed" in result.output
    expected = {
        "walk/moving": (12, 256, 341),
        "walk/single": (1, 256, 256),
        "wave/odd": (5, 256, 407),
        "wave/portrait": (4, 455, 256),
    }
    for vid, (frames, height, width) in expected.items():
        folder = out / vid
        names = sorted(p.name for p in folder.glob("img_*.jpg"))
        assert names == [f"img_{i:05d}.jpg" for i in range(1, frames + 1)]
        assert Image.open(folder / names[-1]).size == (width, height)
        meta = json.loads((folder / "meta.json").read_text())
        assert (meta["num_frames"], meta["height"], meta["width"], meta["index_base"]) == (
            frames,
            height,
            width,
            1,
        )
        assert meta["label"] == vid.split("/")[0] and meta["source"].startswith(vid)
    assert (out / "all.txt").read_text().splitlines() == [
        "walk/moving 12 0",
        "walk/single 1 0",
        "wave/odd 5 1",
        "wave/portrait 4 1",
    ]
    assert (out / "failures.jsonl").read_text() == ""
    assert not (out / ".partial").exists()


def test_frames_match_source_pixels(tmp_path: Path) -> None:
    frames = moving_shapes(3, 64, 96, seed=5)
    write_video(tmp_path / "v" / "a.mkv", frames, codec="ffv1")
    run_batch(
        [VideoEntry("a", "a.mkv")],
        tmp_path / "v",
        tmp_path / "o",
        ExtractSettings(short_side=0, jpeg_quality=100),
    )
    img = np.asarray(Image.open(tmp_path / "o" / "a" / "img_00002.jpg")).astype(int)
    errors = [np.abs(img - f).mean() for f in frames]  # JPEG's 4:2:0 chroma costs ~2.6 levels
    assert errors[1] < 3.5 and errors[1] < min(errors[0], errors[2]) / 3  # img_00002 = frame 1


def test_bad_inputs_are_reported_and_batch_goes_on(corpus: Path, tmp_path: Path) -> None:
    reasons = make_bad_videos(corpus / "broken")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["extract", str(corpus), "-o", str(out), "-q"])
    assert result.exit_code == EXIT_SOME_FAILED
    failures = {
        json.loads(line)["source"]: json.loads(line)["reason"]
        for line in (out / "failures.jsonl").read_text().splitlines()
    }
    present = {f"broken/{n}": r for n, r in reasons.items() if (corpus / "broken" / n).exists()}
    assert set(failures) == set(present)
    for source, reason in present.items():
        assert reason in failures[source]
    assert "4 succeeded (4 extracted, 0 already done), 5 failed" in result.output
    assert (
        f"failed: {next(iter(sorted(present)))}" in result.output
        or "failed: broken/" in result.output
    )
    assert not (out / "broken").exists() and len(list(out.glob("*/*/img_00001.jpg"))) == 4


def test_strict_stops_at_first_failure(tmp_path: Path) -> None:
    make_bad_videos(tmp_path / "v")
    result = CliRunner().invoke(
        main, ["extract", str(tmp_path / "v"), "-o", str(tmp_path / "o"), "-q", "--strict"]
    )
    assert result.exit_code == EXIT_SOME_FAILED
    assert "0 succeeded (0 extracted, 0 already done), 1 failed" in result.output
    assert "--strict" in result.output


def test_strict_stop_keeps_every_finished_video_in_the_lists(tmp_path: Path) -> None:
    root, out = tmp_path / "v", tmp_path / "o"
    for name in ("a", "c"):
        write_video(root / f"{name}.avi", moving_shapes(3, 32, 32))
    (root / "b.avi").write_text("not a video\n")
    args = ["extract", str(root), "-o", str(out), "-q"]
    assert CliRunner().invoke(main, args).exit_code == EXIT_SOME_FAILED
    assert (out / "all.txt").read_text() == "a 3 -1\nc 3 -1\n"
    result = CliRunner().invoke(main, [*args, "--strict"])  # a: skipped, b: fails -> stop
    assert result.exit_code == EXIT_SOME_FAILED
    assert "2 succeeded (0 extracted, 2 already done), 1 failed" in result.output
    assert (out / "all.txt").read_text() == "a 3 -1\nc 3 -1\n"  # c was not reached: still listed


def test_empty_source_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no videos here\n")
    result = CliRunner().invoke(main, ["extract", str(tmp_path / "empty"), "-o", "o"])
    assert result.exit_code == 1
    assert result.output == f"Error: no videos found in {tmp_path / 'empty'}\n"
    assert not (tmp_path / "o").exists()


def test_manifest_with_missing_video_and_splits(tmp_path: Path) -> None:
    write_video(tmp_path / "v" / "run" / "a.avi", moving_shapes(3, 32, 32))
    entries = [
        VideoEntry("run/a", "run/a.avi", "run", 0, {"1": "train", "2": "test"}),
        VideoEntry("run/gone", "run/gone.avi", "run", 0, {"1": "test", "2": "train"}),
    ]
    write_manifest(entries, tmp_path / "v" / "manifest.jsonl")
    out = tmp_path / "o"
    result = CliRunner().invoke(
        main, ["extract", str(tmp_path / "v" / "manifest.jsonl"), "-o", str(out), "-q"]
    )
    assert result.exit_code == EXIT_SOME_FAILED
    assert (out / "train_split1.txt").read_text() == "run/a 3 0\n"
    assert (out / "test_split2.txt").read_text() == "run/a 3 0\n"
    assert not (out / "test_split1.txt").exists()
    assert json.loads((out / "failures.jsonl").read_text()) == {
        "video_id": "run/gone",
        "source": "run/gone.avi",
        "reason": "file not found",
    }


def test_ids_that_name_flowprep_files_in_out_fail(tmp_path: Path) -> None:
    write_video(tmp_path / "v" / "a.avi", moving_shapes(2, 32, 32))
    entries = [
        VideoEntry(vid, "a.avi") for vid in (".partial/x", ".lock", "all.txt", "train_split1.txt")
    ]
    results = run_batch(
        [VideoEntry("a", "a.avi"), *entries], tmp_path / "v", tmp_path / "o", ExtractSettings()
    )
    assert {r.video_id: r.status for r in results} == {
        ".lock": "failed", ".partial/x": "failed", "a": "done", "all.txt": "failed",
        "train_split1.txt": "failed",
    }  # fmt: skip
    assert all("reserved" in r.reason for r in results if r.video_id != "a")
    assert (tmp_path / "o" / "all.txt").read_text() == "a 2 -1\n"
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a", "all.txt", "failures.jsonl"]


def test_resume_skips_done_redoes_partial_and_changed(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    entries = build_manifest(corpus)
    settings = ExtractSettings()
    run_batch(entries, corpus, out, settings)
    before = tree_bytes(out)
    stamp = (out / "walk/moving/img_00001.jpg").stat().st_mtime_ns
    (out / "wave/odd/.done").unlink()  # as if killed before its marker
    (out / "wave/odd/img_00003.jpg").write_bytes(b"half")
    results = {r.video_id: r.status for r in run_batch(entries, corpus, out, settings)}
    assert results == {
        "walk/moving": "skipped",
        "walk/single": "skipped",
        "wave/odd": "done",
        "wave/portrait": "skipped",
    }
    assert tree_bytes(out) == before
    assert (out / "walk/moving/img_00001.jpg").stat().st_mtime_ns == stamp
    smaller = ExtractSettings(short_side=128)
    assert {r.status for r in run_batch(entries, corpus, out, smaller)} == {"done"}
    assert Image.open(out / "walk/moving/img_00001.jpg").size == (171, 128)
    assert {r.status for r in run_batch(entries, corpus, out, smaller, force=True)} == {"done"}


def test_done_marker_without_readable_meta_is_redone(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    entries = build_manifest(corpus)
    run_batch(entries, corpus, out, ExtractSettings())
    before = tree_bytes(out)
    (out / "walk/moving/meta.json").unlink()
    (out / "wave/odd/meta.json").write_text('{"num_frames": ')
    (out / "wave/portrait/meta.json").write_text('{"num_frames": "4"}')
    results = {r.video_id: r.status for r in run_batch(entries, corpus, out, ExtractSettings())}
    assert results == {
        "walk/moving": "done",
        "walk/single": "skipped",
        "wave/odd": "done",
        "wave/portrait": "done",
    }
    assert tree_bytes(out) == before


def test_failed_redo_keeps_earlier_output(tmp_path: Path) -> None:
    video = write_video(tmp_path / "v" / "a.avi", moving_shapes(4, 32, 32))
    entry = VideoEntry("a", "a.avi")
    assert extract_video(entry, tmp_path / "v", tmp_path / "o", ExtractSettings()).status == "done"
    before = tree_bytes(tmp_path / "o" / "a")
    video.write_bytes(b"corrupted in place")
    result = extract_video(entry, tmp_path / "v", tmp_path / "o", ExtractSettings())
    assert (result.status, result.reason.split(" (")[0]) == (
        "failed",
        "not a readable video container",
    )
    assert tree_bytes(tmp_path / "o" / "a") == before


def test_bad_source_and_options_are_one_line(tmp_path: Path) -> None:
    bogus = tmp_path / "clip.avi"
    bogus.write_bytes(bytes(range(256)) * 4)
    result = CliRunner().invoke(main, ["extract", str(bogus), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.output == (
        f"Error: {bogus}: not a manifest (binary file); pass a manifest from "
        "`flowprep index` or a folder of videos\n"
    )
    result = CliRunner().invoke(main, ["extract", str(tmp_path), "-o", "o", "--quality", "0"])
    assert result.exit_code == 2 and "--quality" in result.output


def test_jobs_help_names_processes_and_threads() -> None:
    text = " ".join(CliRunner().invoke(main, ["extract", "--help"]).output.split())
    assert "joblib processes with --modality rgb or --flow-backend opencv" in text
    assert "torch flow backend, decoding threads (at least two per device)" in text


def test_every_command_and_option_has_help() -> None:
    for name, command in main.commands.items():
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0, name
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert param.help, f"{name} {param.name} has no help"
                assert param.opts[0] in result.output


@pytest.mark.skipif(not SHARED.exists(), reason="shared sample data not present")
def test_real_clips_extract(tmp_path: Path) -> None:
    out = tmp_path / "o"
    results = run_batch(
        build_manifest(SHARED / "videos"), SHARED / "videos", out, ExtractSettings()
    )
    assert [(r.video_id, r.status, r.num_frames) for r in results] == [
        ("Megamind", "done", 270),
        ("Megamind_bugy", "done", 270),
        ("tree", "done", 68),
    ]
    meta = json.loads((out / "Megamind_bugy" / "meta.json").read_text())
    assert (meta["source_fps"], meta["width"], meta["height"]) == (30.0, 349, 256)


def _flowprep(*args: str) -> list[str]:
    return [sys.executable, "-m", "flowprep", *args]


def test_kill_9_then_rerun_is_byte_identical(tmp_path: Path) -> None:
    root = tmp_path / "v"
    for i in range(8):
        write_video(root / f"c{i % 2}" / f"clip{i}.avi", moving_shapes(40, 240, 320, seed=i))
    reference = tmp_path / "ref"
    subprocess.run(_flowprep("extract", str(root), "-o", str(reference), "-q"), check=True)
    out = tmp_path / "out"
    for wait_for_done in (1, 4):  # kill twice: early, then part-way through the rerun
        proc = subprocess.Popen(
            _flowprep("extract", str(root), "-o", str(out), "-q"), stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while len(list(out.glob("*/*/.done"))) < wait_for_done and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert len(list(out.glob("*/*/.done"))) < 8, "finished before the kill: test proves nothing"
    done = subprocess.run(
        _flowprep("extract", str(root), "-o", str(out), "-q"),
        capture_output=True,
        text=True,
        check=True,
    )
    assert "already done" in done.stderr
    assert tree_bytes(out) == tree_bytes(reference)


def _children(pid: int) -> list[int]:
    """Child process ids of `pid`, from /proc (Linux)."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_kill_9_with_worker_processes_then_rerun_is_byte_identical(tmp_path: Path) -> None:
    # -j 2 on RGB runs joblib (loky) worker processes; kill -9 reaches only the parent, as an
    # OOM killer would, and the rerun starts at once. 300-frame clips keep the workers busy
    # well past the kill: orphans must not write into OUT while the rerun rebuilds it.
    clip = write_video(tmp_path / "clip.avi", moving_shapes(300, 240, 320, seed=0))
    root = tmp_path / "v"
    for i in range(4):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(clip, root / f"c{i % 2}" / f"clip{i}.avi")
    args = ("extract", str(root), "-q", "-j", "2", "--short-side", "0", "-o")
    subprocess.run(_flowprep(*args, str(tmp_path / "ref")), check=True)
    out = tmp_path / "out"
    proc = subprocess.Popen(_flowprep(*args, str(out)), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(out.glob("*/*/.done")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    workers = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert workers and len(list(out.glob("*/*/.done"))) < 4, "nothing left to interrupt"
    rerun = subprocess.run(_flowprep(*args, str(out)), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert (out / "failures.jsonl").read_text() == ""
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")
    deadline = time.monotonic() + 10  # the orphaned workers notice their parent died and exit
    while any(_running(pid) for pid in workers):
        assert time.monotonic() < deadline, "orphaned worker processes outlived their parent"
        time.sleep(0.05)


def test_workers_of_a_replaced_run_write_nothing(tmp_path: Path) -> None:
    write_video(tmp_path / "v" / "a.avi", moving_shapes(3, 32, 32))
    entry, out = VideoEntry("a", "a.avi"), tmp_path / "o"
    with claim_output(out) as killed_run:
        pass  # a run that ended (or was killed) while one of its workers still holds its claim
    with claim_output(out) as rerun:
        stale = extract_video(entry, tmp_path / "v", out, ExtractSettings(), claim=killed_run)
        assert (stale.status, stale.reason.split(":")[0]) == ("failed", "Superseded")
        assert not (out / "a").exists()
        assert [p.name for p in (out / ".partial").iterdir()] == [".owner"]
        fresh = extract_video(entry, tmp_path / "v", out, ExtractSettings(), claim=rerun)
        assert fresh.status == "done" and (out / "a" / ".done").exists()
    assert sorted(p.name for p in out.iterdir()) == ["a"]  # no .partial, no .lock


def test_second_live_run_on_the_same_output_is_refused(tmp_path: Path, monkeypatch) -> None:
    write_video(tmp_path / "v" / "a.avi", moving_shapes(3, 32, 32))
    (tmp_path / "o").mkdir()
    monkeypatch.setattr(ownership, "LOCK_WAIT_S", 0.1)
    fd = lock_exclusive(tmp_path / "o" / ".lock")  # as a live run holds it
    try:
        result = CliRunner().invoke(
            main, ["extract", str(tmp_path / "v"), "-o", str(tmp_path / "o"), "-q"]
        )
    finally:
        os.close(fd)
    assert result.exit_code == 1
    assert result.output == (
        f"Error: {tmp_path / 'o'}: another flowprep run is writing here (it holds .lock); "
        "wait for it to finish\n"
    )
    assert not (tmp_path / "o" / "a").exists()


def test_planted_partial_symlink_is_refused_not_emptied(tmp_path: Path) -> None:
    write_video(tmp_path / "v" / "a.avi", moving_shapes(2, 32, 32))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me\n")
    out = tmp_path / "o"
    out.mkdir()
    (out / ".partial").symlink_to(victim)
    result = CliRunner().invoke(main, ["extract", str(tmp_path / "v"), "-o", str(out), "-q"])
    assert result.exit_code == 1
    assert result.output == (
        f"Error: {out / '.partial'} is a symlink; flowprep will not follow it to stage videos "
        "in (remove it and rerun)\n"
    )
    assert [p.name for p in victim.iterdir()] == ["precious.txt"]
    assert sorted(p.name for p in out.iterdir()) == [".partial"]  # lock released, nothing made
    (out / ".lock").symlink_to(tmp_path / "made-elsewhere")
    (out / ".partial").unlink()
    result = CliRunner().invoke(main, ["extract", str(tmp_path / "v"), "-o", str(out), "-q"])
    assert result.exit_code == 1
    assert result.output == (
        f"Error: {out / '.lock'} is a symlink; flowprep will not follow it to lock (remove it "
        "and rerun)\n"
    )
    assert not (tmp_path / "made-elsewhere").exists()


def test_planted_report_temp_symlinks_do_not_truncate_their_targets(tmp_path: Path) -> None:
    write_video(tmp_path / "v" / "a.avi", moving_shapes(2, 32, 32))
    out = tmp_path / "o"
    out.mkdir()
    victims = {}
    for name in (".failures.jsonl.tmp", ".all.txt.tmp"):
        victims[name] = tmp_path / f"victim{name}"
        victims[name].write_text("keep me\n")
        (out / name).symlink_to(victims[name])
    result = CliRunner().invoke(main, ["extract", str(tmp_path / "v"), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert all(v.read_text() == "keep me\n" for v in victims.values())
    assert (out / "all.txt").read_text() == "a 2 -1\n"
    assert sorted(p.name for p in out.iterdir()) == ["a", "all.txt", "failures.jsonl"]


# Runs run_batch(force=True) on OUT in a fresh process that SIGKILLs itself inside the
# replacement of the finished video: after the atomic exchange ("exchange"), or, with the
# exchange unavailable, between moving the old folder aside and renaming the new one in.
_KILL_IN_SWAP = """
import os, signal, sys
from pathlib import Path
from flowprep import ownership
from flowprep.extract import run_batch
from flowprep.settings import ExtractSettings
from flowprep.manifest import VideoEntry
root, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "exchange":
    real_exchange = ownership.exchange_paths
    def exchange(a, b):
        assert real_exchange(a, b), "no renameat2 exchange here"
        die()
    ownership.exchange_paths = exchange
else:
    ownership.exchange_paths = lambda a, b: False
    real_rename = os.rename
    def rename(src, dst, *args, **kwargs):
        real_rename(src, dst, *args, **kwargs)
        if str(dst).endswith(".old"):
            die()
    os.rename = rename
run_batch([VideoEntry("c/a", "c/a.avi")], root, out, ExtractSettings(short_side=16), force=True)
"""


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_kill_9_while_replacing_a_finished_video_loses_nothing(tmp_path: Path, mode: str) -> None:
    video = write_video(tmp_path / "v" / "c" / "a.avi", moving_shapes(3, 32, 32))
    out, entry = tmp_path / "o", VideoEntry("c/a", "c/a.avi")
    run_batch([entry], tmp_path / "v", out, ExtractSettings())
    before = tree_bytes(out / "c" / "a")
    args = [str(tmp_path / "v"), str(out), mode]
    killed = subprocess.run([sys.executable, "-c", _KILL_IN_SWAP, *args])
    assert killed.returncode == -signal.SIGKILL
    if mode == "fallback":  # the window: the old copy only under .partial
        assert not (out / "c" / "a").exists() and list((out / ".partial").glob("*.old"))
        video.write_bytes(b"the source went bad since")  # so the redo below fails
        results = run_batch([entry], tmp_path / "v", out, ExtractSettings(short_side=16))
        assert results[0].status == "failed"
        assert tree_bytes(out / "c" / "a") == before  # put back, not wiped with .partial
        assert sorted(p.name for p in out.iterdir()) == ["c", "failures.jsonl"]  # not listed
    else:  # the exchange happened: the new video is in place, the old one is discarded
        meta = json.loads((out / "c" / "a" / "meta.json").read_text())
        assert meta["settings"]["short_side"] == 16
        results = run_batch([entry], tmp_path / "v", out, ExtractSettings(short_side=16))
        assert results[0].status == "skipped"
        assert sorted(p.name for p in out.iterdir()) == ["all.txt", "c", "failures.jsonl"]


def test_error_between_the_renames_puts_the_old_video_back(tmp_path: Path, monkeypatch) -> None:
    write_video(tmp_path / "v" / "a.avi", moving_shapes(3, 32, 32))
    entry = VideoEntry("a", "a.avi")
    run_batch([entry], tmp_path / "v", tmp_path / "o", ExtractSettings())
    before = tree_bytes(tmp_path / "o" / "a")
    monkeypatch.setattr(ownership, "exchange_paths", lambda a, b: False)
    real_rename, failed = os.rename, []

    def rename(src: Path, dst: Path) -> None:  # the new folder cannot be renamed in, once
        if str(dst) == str(tmp_path / "o" / "a") and ".old" not in str(src) and not failed:
            failed.append(src)
            raise OSError(5, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    result = extract_video(entry, tmp_path / "v", tmp_path / "o", ExtractSettings(), force=True)
    assert (result.status, result.reason) == ("failed", "OSError: [Errno 5] Input/output error")
    assert tree_bytes(tmp_path / "o" / "a") == before


def test_lists_of_an_earlier_run_do_not_survive(tmp_path: Path) -> None:
    for name in ("a", "b"):
        write_video(tmp_path / "v" / f"{name}.avi", moving_shapes(2, 32, 32))
    manifest, out = tmp_path / "v" / "m.jsonl", tmp_path / "o"
    first = [VideoEntry("a", "a.avi", "x", 0, {"1": "train"}), VideoEntry("b", "b.avi", "x", 0,
             {"1": "test", "2": "train"})]  # fmt: skip
    write_manifest(first, manifest)
    assert CliRunner().invoke(main, ["extract", str(manifest), "-o", str(out), "-q"]).exit_code == 0
    assert sorted(p.name for p in out.glob("*.txt")) == [
        "test_split1.txt", "train_split1.txt", "train_split2.txt"
    ]  # fmt: skip
    second = [VideoEntry("a", "a.avi", "x", 0, {"1": "test"}), VideoEntry("b", "b.avi", "x", 0,
              {"1": "test"})]  # fmt: skip
    write_manifest(second, manifest)
    assert CliRunner().invoke(main, ["extract", str(manifest), "-o", str(out), "-q"]).exit_code == 0
    assert sorted(p.name for p in out.glob("*.txt")) == ["test_split1.txt"]
    assert (out / "test_split1.txt").read_text() == "a 2 0\nb 2 0\n"  # a is not also train


def test_ids_with_whitespace_fail_alone(tmp_path: Path) -> None:
    write_video(tmp_path / "v" / "a.avi", moving_shapes(2, 32, 32))
    write_video(tmp_path / "v" / "my clip.avi", moving_shapes(2, 32, 32))
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["extract", str(tmp_path / "v"), "-o", str(out), "-q"])
    assert result.exit_code == EXIT_SOME_FAILED
    assert json.loads((out / "failures.jsonl").read_text())["reason"] == (
        "video_id 'my clip' contains whitespace ' '"
    )
    assert (out / "all.txt").read_text() == "a 2 -1\n"


def test_a_marker_that_is_not_a_json_object_means_not_done(tmp_path: Path) -> None:
    """A `.done` holding a list (hand-edited, or another tool's) is redone, not a crash."""
    write_video(tmp_path / "v" / "a.avi", moving_shapes(3, 32, 32))
    entry, out = VideoEntry("a", "a.avi"), tmp_path / "o"
    run_batch([entry], tmp_path / "v", out, ExtractSettings())
    (out / "a" / ".done").write_text("[]")
    results = run_batch([entry], tmp_path / "v", out, ExtractSettings())
    assert [r.status for r in results] == ["done"]
    assert json.loads((out / "a" / ".done").read_text())["rotation"] == 0
