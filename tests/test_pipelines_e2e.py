"""`pipelines run synthetic_ci` end to end: every row of the table, a rerun that runs nothing,
and a kill -9 during a training stage after which the same command gives the same table."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.config import load_pipeline

COLUMNS = ["Appearance stream", "Motion stream", "Two-Streams", "ST-ResNet", "ST-ResNet*"]
COLUMNS += ["Conv fusion", "3D ResNet-18"]
KINDS = ["appearance", "motion", "wmw", "order"]


def pipelines_run(run: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipelines", "run", "synthetic_ci", "--out", str(run), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("pipeline") / "run"
    result = pipelines_run(run)
    assert result.returncode == 0, result.stdout + result.stderr
    return run, result.stdout


def test_table_has_every_column_row_and_group(ci_run) -> None:
    run, stdout = ci_run
    assert stdout.rstrip().endswith(f"table: {run}/table.md (and table.csv, table.png beside it)")
    md = (run / "table.md").read_text()
    header = "| Dataset | Split | " + " | ".join(COLUMNS) + " |"
    assert header in md
    ours = [ln for ln in md.splitlines() if ln.startswith("| Synthetic (ours) | 1 |")]
    assert len(ours) == 1 and ours[0].count("|") == len(COLUMNS) + 3
    assert "| UCF101 (paper) | | 82.3 | 79.0 | 89.5 | 92.8 | 93.5 | 86.0 | – |" in md
    for kind in KINDS:
        assert any(ln.startswith(f"| {kind} | ") for ln in md.splitlines())
    rows = list(csv.DictReader((run / "table.csv").open()))
    assert len(rows) == len(COLUMNS) * (1 + len(KINDS))
    for row in rows:
        assert 0.0 <= float(row["top1_percent"]) <= 100.0
    assert (run / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the column numbers are the evaluations' own
    st = json.loads((run / "eval/Synthetic/split1/st-resnet/st-resnet_split1.json").read_text())
    got = next(r for r in rows if r["column"] == "st-resnet" and r["group"] == "all")
    assert float(got["top1_percent"]) == pytest.approx(100 * st["top1"], abs=0.006)


def test_rerun_skips_every_stage(ci_run) -> None:
    run, _ = ci_run
    before = (run / "table.csv").read_bytes()
    result = pipelines_run(run, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    stages = [ln for ln in result.stdout.splitlines() if ln.startswith("[")]
    assert stages and all(ln.endswith(": cached") for ln in stages), stages
    assert len(stages) == 18  # synth, index, extract, pack, 6 x (train, eval), fuse, table
    assert (run / "table.csv").read_bytes() == before


def training_with_checkpoint(run: Path) -> str | None:
    """The training stage that is running and has written a checkpoint, if any."""
    for record in (run / ".stages").glob("train__*.json"):
        try:
            state = json.loads(record.read_text())["state"]
        except (OSError, ValueError, KeyError):
            continue
        name = record.stem.replace("__", "/")
        if state == "started" and (run / name / "checkpoint.pt").exists():
            return name
    return None


def test_kill_during_training_then_rerun_gives_the_same_table(ci_run, tmp_path: Path) -> None:
    done, _ = ci_run
    run = tmp_path / "run"
    # start from the finished data stages of the first run, to spend the time on training
    for sub in ("data", "prep"):
        shutil.copytree(done / sub, run / sub, symlinks=True)
    (run / ".stages").mkdir()
    for name in ("synth", "index", "extract", "pack"):
        src = done / ".stages" / f"{name}__Synthetic.json"
        shutil.copy(src, run / ".stages" / src.name)
    cmd = [sys.executable, "-m", "pipelines", "run", "synthetic_ci", "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while (killed := training_with_checkpoint(run)) is None:
        assert proc.poll() is None, "pipelines run ended before the kill"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = run / killed / "checkpoint.pt"
    time.sleep(1.0)  # the training child dies with the runner: its checkpoint stops changing
    stamp = ckpt.stat().st_mtime_ns
    time.sleep(1.5)
    assert ckpt.stat().st_mtime_ns == stamp
    assert not (run / "table.csv").exists()
    result = pipelines_run(run)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{killed}: resuming" in result.stdout
    finished = [s for s in load_pipeline("synthetic_ci").phases]
    finished = finished[: finished.index(killed.rsplit("/", 1)[1])]
    for phase in finished:
        assert f"train/Synthetic/split1/{phase}: cached" in result.stdout
    assert (run / "table.csv").read_bytes() == (done / "table.csv").read_bytes()


def test_ci_config_is_the_mini_one_scaled_down() -> None:
    """The CI run checks the demo's path: same stages, same columns, smaller numbers only."""
    ci, mini = load_pipeline("synthetic_ci"), load_pipeline("synthetic_mini")
    assert list(ci.phases) == list(mini.phases)
    assert [c.key for c in ci.columns] == [c.key for c in mini.columns]
    assert {p: s.config for p, s in ci.phases.items()} == {
        p: s.config for p, s in mini.phases.items()
    }
