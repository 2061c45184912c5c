"""The stage runner: finished stages are skipped, failures are one line, outputs are owned."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from flowprep.atomic import lock_exclusive, release_lock
from pipelines.config import PipelineError
from pipelines.plan import Stage, stage_key
from pipelines.runner import Runner, read_record


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def writer(name: str, text: str) -> Stage:
    """A stage that appends `text` to <name>/out.txt and prints its argv."""
    code = (
        "import os, sys; os.makedirs(sys.argv[1], exist_ok=True); "
        "open(os.path.join(sys.argv[1], 'out.txt'), 'a').write(sys.argv[2]); print(sys.argv)"
    )
    return Stage(name, "train", py(code) + [name, text], name)


def keyed(stages: list[Stage]) -> list[Stage]:
    keys: dict[str, str] = {}
    for s in stages:
        s.key = keys[s.name] = stage_key(s, keys)
    return stages


def run(tmp_path: Path, stages: list[Stage]) -> tuple[dict, list[str]]:
    lines: list[str] = []
    states = Runner(tmp_path, lines.append).execute(keyed(stages), lambda: tmp_path)
    return states, lines


def test_finished_stages_are_skipped_and_changed_ones_redone_from_empty(tmp_path: Path) -> None:
    first, _ = run(tmp_path, [writer("a", "1"), writer("b", "2")])
    assert first == {"a": "ran", "b": "ran"}
    again, lines = run(tmp_path, [writer("a", "1"), writer("b", "2")])
    assert again == {"a": "cached", "b": "cached"}
    assert lines == ["[1/2] a: cached", "[2/2] b: cached"]
    b = writer("b", "3")
    b.deps = ["a"]
    changed, _ = run(tmp_path, [writer("a", "1"), b])
    assert changed == {"a": "cached", "b": "ran"}
    assert (tmp_path / "b" / "out.txt").read_text() == "3"  # old output removed first
    assert (tmp_path / "a" / "out.txt").read_text() == "1"


def test_failed_stage_is_one_line_and_earlier_stages_stay_done(tmp_path: Path) -> None:
    bad = Stage("c", "eval", py("import sys; print('working'); print('ValueError: no'); "
                                "print('bye'); sys.exit(2)"), "c")  # fmt: skip
    with pytest.raises(PipelineError) as err:
        run(tmp_path, [writer("a", "1"), bad])
    log = tmp_path / "logs" / "c.log"
    assert str(err.value) == f"stage c failed (exit 2): ValueError: no (log: {log})"
    assert read_record(tmp_path, "a")["state"] == "done"
    assert read_record(tmp_path, "c")["state"] == "started"
    states, _ = run(tmp_path, [writer("a", "1"), writer("c", "ok")])
    assert states == {"a": "cached", "c": "ran"}


def test_interrupted_training_resumes_with_the_same_key_only(tmp_path: Path) -> None:
    stage = keyed([writer("t", "x")])[0]
    (tmp_path / ".stages").mkdir()
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "checkpoint.pt").write_bytes(b"")
    record = {"key": stage.key, "state": "started"}
    (tmp_path / ".stages" / "t.json").write_text(json.dumps(record))
    states, _ = run(tmp_path, [writer("t", "x")])
    assert states == {"t": "resumed"}
    assert "'--resume'" in (tmp_path / "logs" / "t.log").read_text()
    assert (tmp_path / "t" / "checkpoint.pt").exists()  # kept for the resume
    record["key"] = "older settings"
    record["state"] = "started"
    (tmp_path / ".stages" / "t.json").write_text(json.dumps(record))
    states, _ = run(tmp_path, [writer("t", "x")])
    assert states == {"t": "ran"} and not (tmp_path / "t" / "checkpoint.pt").exists()


def test_planted_symlink_output_is_refused_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "a").symlink_to(victim)
    with pytest.raises(PipelineError, match=r"stage a: .*a is a symlink; refusing to clear it"):
        run(run_dir, [writer("a", "1")])
    assert (victim / "keep.txt").read_text() == "mine"


def test_a_busy_run_folder_is_one_line(tmp_path: Path) -> None:
    fd = lock_exclusive(tmp_path / ".lock")
    try:
        with pytest.raises(PipelineError, match=r"is busy with another pipelines run$"):
            run(tmp_path, [writer("a", "1")])
    finally:
        release_lock(tmp_path / ".lock", fd)
